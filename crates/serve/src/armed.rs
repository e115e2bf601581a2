//! [`Armed`]: a future that is polled again only when it may have become ready.
//!
//! A connection's task waits on its connection and, beside it, on watchdog futures: the
//! eviction and shutdown tokens and the idle deadline. `tokio::select!` polls every branch
//! each time the task wakes, and the task wakes two or three times per request for the
//! connection's reads and writes. Polling a `CancellationToken`'s `cancelled()` locks its
//! waiter list to refresh the waker, and polling a `Sleep` refreshes the timer entry's
//! waker; callgrind put the two at about 1 400 instructions per proxied request, most of
//! them spent finding out that nothing had changed.
//!
//! Once such a future has registered the task's waker (its first pending poll), whatever
//! it waits for wakes the task when it happens. So later polls can first ask a cheap
//! question (is the token cancelled, has the timer fired) and return `Pending` at once when
//! the answer is no, as long as the task's waker is still the one registered
//! (`Waker::will_wake`); when it changed, the inner future is polled to register the new
//! one.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

pin_project_lite::pin_project! {
    /// `inner`, polled only on its first poll, when `ready(&inner)` says it may be done, or
    /// when the task's waker changed. `ready` must become true no later than `inner` wakes
    /// its waker (a cancelled token's flag, a fired timer's state), or the wake is lost.
    pub(crate) struct Armed<F, R> {
        #[pin]
        inner: F,
        ready: R,
        registered: Option<Waker>,
    }
}

impl<F, R> Armed<F, R>
where
    F: Future,
    R: Fn(&F) -> bool,
{
    pub(crate) fn new(inner: F, ready: R) -> Self {
        Armed {
            inner,
            ready,
            registered: None,
        }
    }
}

impl<F, R> Future for Armed<F, R>
where
    F: Future,
    R: Fn(&F) -> bool,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let mut this = self.project();
        if let Some(w) = this.registered.as_ref() {
            if w.will_wake(cx.waker()) && !(this.ready)(this.inner.as_ref().get_ref()) {
                return Poll::Pending;
            }
        }
        let polled = this.inner.as_mut().poll(cx);
        if polled.is_pending() {
            match this.registered.as_mut() {
                Some(w) => w.clone_from(cx.waker()),
                None => *this.registered = Some(cx.waker().clone()),
            }
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    /// A future that counts its polls and never finishes.
    struct Counted(Arc<AtomicUsize>);
    impl Future for Counted {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn the_inner_future_is_polled_only_when_it_may_be_ready() {
        let polls = Arc::new(AtomicUsize::new(0));
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = flag.clone();
        let mut armed = std::pin::pin!(Armed::new(Counted(polls.clone()), move |_: &Counted| {
            f.load(Ordering::Relaxed)
        }));
        let waker = nop_waker();
        let mut cx = Context::from_waker(&waker);
        for _ in 0..5 {
            assert!(armed.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(
            polls.load(Ordering::Relaxed),
            1,
            "registered once, then skipped"
        );
        flag.store(true, Ordering::Relaxed);
        assert!(armed.as_mut().poll(&mut cx).is_pending());
        assert_eq!(
            polls.load(Ordering::Relaxed),
            2,
            "polled when it may be ready"
        );
        // Another waker: the inner future must see it to wake the right task.
        flag.store(false, Ordering::Relaxed);
        let other = nop_waker();
        assert!(armed
            .as_mut()
            .poll(&mut Context::from_waker(&other))
            .is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 3, "polled for the new waker");
    }

    #[tokio::test]
    async fn a_token_and_a_timer_still_end_the_wait() {
        let token = CancellationToken::new();
        let t = token.clone();
        let cancelled = Armed::new(token.cancelled(), move |_| t.is_cancelled());
        let canceller = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            canceller.cancel();
        });
        tokio::time::timeout(Duration::from_secs(10), cancelled)
            .await
            .expect("the cancellation wakes the armed wait");
        let sleep = Armed::new(
            tokio::time::sleep(Duration::from_millis(20)),
            tokio::time::Sleep::is_elapsed,
        );
        tokio::time::timeout(Duration::from_secs(10), sleep)
            .await
            .expect("the timer wakes the armed wait");
    }

    /// A waker that does nothing (each call a distinct one).
    fn nop_waker() -> Waker {
        struct Nop;
        impl std::task::Wake for Nop {
            fn wake(self: Arc<Self>) {}
        }
        Waker::from(Arc::new(Nop))
    }
}
