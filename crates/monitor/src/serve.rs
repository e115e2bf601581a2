//! Serving an axum [`Router`] over mutual TLS through the one serve path
//! (`serve::serve_http`), with the verified client certificate's identity handed to
//! handlers as a [`Peer`] request extension.

use std::sync::Arc;

use axum::Router;
use firewall::GuardedListener;
use pki::Identity;
use serve::{HttpOptions, RoleTasks};
use tower::ServiceBuilder;
use tower_http::timeout::RequestBodyTimeoutLayer;

/// The identity of the connection's verified client certificate (`None`: the certificate
/// chains to the CA but carries no `rampart://` identity), a request extension.
#[derive(Debug, Clone)]
pub struct Peer(pub Option<Identity>);

/// Serves `app` on `listener` as one of `tasks` until the role shuts down. The policy's
/// caller identities for the listener are enforced before `app` sees a request; `app`
/// may narrow them per route (e.g. admin only).
pub fn spawn(
    listener: GuardedListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    tasks: &RoleTasks,
) {
    spawn_with(listener, Some(tls), app, tasks)
}

/// [`spawn`], with TLS optional (`None`: plain HTTP, the standalone agent's `/metrics`).
/// Request bodies sent with `Content-Encoding: gzip` reach `app` decompressed (RFC 9110
/// section 8.4; other codings get 415), so a handler's size cap applies to the
/// decompressed bytes.
pub fn spawn_with(
    listener: GuardedListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    tasks: &RoleTasks,
) {
    let body_timeout = listener.limits().body_timeout();
    let service = ServiceBuilder::new()
        .layer(RequestBodyTimeoutLayer::new(body_timeout))
        .layer(tower_http::decompression::RequestDecompressionLayer::new())
        .service(app);
    let opts = HttpOptions {
        tls,
        on_ended: None,
        h2c: false,
    };
    tasks.spawn(serve::serve_http(
        listener,
        opts,
        move |info: &serve::ConnInfo| {
            let peer = Peer(info.identity.clone());
            ServiceBuilder::new()
                .map_request(move |mut req: http::Request<_>| {
                    req.extensions_mut().insert(peer.clone());
                    req
                })
                .service(service.clone())
        },
        tasks.token(),
        tasks.tracker(),
    ));
}
