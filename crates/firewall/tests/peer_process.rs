#![allow(clippy::unwrap_used, missing_docs)]
//! `peer_process`: which local process holds the client's side of an accepted connection,
//! with real sockets on 127.93.40.0/24 and a client in this process or in a child process.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use firewall::peer_process::{is_owned_by, owner_pid, owner_pids};

/// Accepts one connection on `listener` within about ten seconds (a bounded poll, so a
/// client that never connects fails the test instead of hanging it).
fn accept_bounded(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    listener.set_nonblocking(true).unwrap();
    for _ in 0..1_000 {
        match listener.accept() {
            Ok(accepted) => return accepted,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    panic!("no connection within the bounded wait");
}

/// Kills and reaps the child when the test ends, passing or not.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_client_in_this_process_is_ours() {
    let listener = TcpListener::bind("127.93.40.1:0").unwrap();
    let local = listener.local_addr().unwrap();
    let _client = TcpStream::connect(local).unwrap();
    let (stream, peer) = accept_bounded(&listener);
    assert_eq!(stream.local_addr().unwrap(), local);
    let me = std::process::id();
    assert!(is_owned_by(local, peer, me).unwrap());
    assert_eq!(owner_pid(local, peer).unwrap(), Some(me));
    assert_eq!(owner_pids(local, peer).unwrap(), [me]);
}

#[test]
fn a_client_in_a_child_process_is_the_childs() {
    let listener = TcpListener::bind("127.93.40.2:0").unwrap();
    let local = listener.local_addr().unwrap();
    // bash opens the connection on descriptor 3, then becomes `sleep` (same pid, the
    // descriptor kept): one process holds the socket, the child.
    let script = format!(
        "exec 3<>/dev/tcp/{}/{} && exec sleep 30",
        local.ip(),
        local.port()
    );
    let child = match Command::new("bash")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .spawn()
    {
        Ok(c) => Reaped(c),
        Err(e) => {
            eprintln!("SKIP: bash cannot be run: {e}");
            return;
        }
    };
    let (_stream, peer) = accept_bounded(&listener);
    let child_pid = child.0.id();
    let me = std::process::id();
    assert_ne!(child_pid, me);
    assert!(is_owned_by(local, peer, child_pid).unwrap());
    assert!(!is_owned_by(local, peer, me).unwrap());
    assert_eq!(owner_pid(local, peer).unwrap(), Some(child_pid));
    assert_eq!(owner_pids(local, peer).unwrap(), [child_pid]);
}

#[test]
fn no_such_connection_has_no_owner() {
    let listener = TcpListener::bind("127.93.40.3:0").unwrap();
    let local = listener.local_addr().unwrap();
    // Nobody connected from this address and port.
    let peer: SocketAddr = "127.93.40.4:1".parse().unwrap();
    assert_eq!(owner_pid(local, peer).unwrap(), None);
    assert!(owner_pids(local, peer).unwrap().is_empty());
    assert!(!is_owned_by(local, peer, std::process::id()).unwrap());
    // A process that does not exist owns nothing either (pid_max is at most 2^22).
    let _client = TcpStream::connect(local).unwrap();
    let (_stream, peer) = accept_bounded(&listener);
    assert!(!is_owned_by(local, peer, u32::MAX).unwrap());
    assert!(!is_owned_by(local, peer, 4_194_304 + 1).unwrap());
}

#[test]
fn an_ipv6_client_is_found_in_tcp6() {
    let listener = match TcpListener::bind("[::1]:0") {
        Ok(l) => l,
        Err(e) => {
            eprintln!("SKIP: no IPv6 loopback: {e}");
            return;
        }
    };
    let local = listener.local_addr().unwrap();
    let _client = TcpStream::connect(local).unwrap();
    let (_stream, peer) = accept_bounded(&listener);
    let me = std::process::id();
    assert!(is_owned_by(local, peer, me).unwrap());
    assert_eq!(owner_pid(local, peer).unwrap(), Some(me));
}

#[test]
fn dual_stack_sockets_are_found_by_their_ipv4_address() {
    let me = std::process::id();
    // An IPv6 client socket (listed in /proc/net/tcp6 as ::ffff:a.b.c.d) to an IPv4
    // listener, which sees an IPv4 peer.
    let listener = TcpListener::bind("127.93.40.6:0").unwrap();
    let local = listener.local_addr().unwrap();
    let mapped: SocketAddr = format!("[::ffff:{}]:{}", local.ip(), local.port())
        .parse()
        .unwrap();
    match TcpStream::connect(mapped) {
        Ok(_client) => {
            let (_stream, peer) = accept_bounded(&listener);
            assert!(peer.is_ipv4());
            assert!(is_owned_by(local, peer, me).unwrap());
            assert_eq!(owner_pid(local, peer).unwrap(), Some(me));
        }
        Err(e) => eprintln!("SKIP: no IPv4-mapped IPv6 connect: {e}"),
    }
    // An IPv6 listener on a mapped address, which sees IPv4-mapped peers of an IPv4 client.
    let Ok(listener) = TcpListener::bind("[::ffff:127.93.40.7]:0") else {
        eprintln!("SKIP: no IPv4-mapped IPv6 listener");
        return;
    };
    let local = listener.local_addr().unwrap();
    let v4 = SocketAddr::new("127.93.40.7".parse().unwrap(), local.port());
    let _client = TcpStream::connect(v4).unwrap();
    let (_stream, peer) = accept_bounded(&listener);
    assert!(peer.is_ipv6());
    assert!(is_owned_by(local, peer, me).unwrap());
    assert_eq!(owner_pid(local, peer).unwrap(), Some(me));
}
