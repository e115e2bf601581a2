//! Which local process holds the other end of an accepted loopback TCP connection, from
//! `/proc/net/tcp{,6}` and `/proc/PID/fd` (proc(5)).

use std::io;
use std::net::SocketAddr;

/// Whether process `pid` holds the socket whose local address is `peer` and remote address
/// `local` — i.e. whether `pid` is the client of the connection our listener at `local`
/// accepted from `peer`.
///
/// Errors: `/proc` unreadable (not Linux, or `pid` gone and its fd table unreadable).
pub fn is_owned_by(local: SocketAddr, peer: SocketAddr, pid: u32) -> io::Result<bool> {
    let Some(inode) = socket_inode(local, peer)? else {
        return Ok(false);
    };
    let process = procfs::process::Process::new(pid as i32).map_err(to_io)?;
    let fds = process.fd().map_err(to_io)?;
    Ok(fds
        .flatten()
        .any(|fd| matches!(fd.target, procfs::process::FDTarget::Socket(i) if i == inode)))
}

/// The inode of the client-side socket of the connection `peer` → `local`.
fn socket_inode(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<u64>> {
    let entries = if peer.is_ipv4() {
        procfs::net::tcp()
    } else {
        procfs::net::tcp6()
    }
    .map_err(to_io)?;
    Ok(entries
        .into_iter()
        .find(|e| e.local_address == peer && e.remote_address == local)
        .map(|e| e.inode))
}

fn to_io(e: procfs::ProcError) -> io::Error {
    io::Error::other(e.to_string())
}
