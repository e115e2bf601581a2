//! Which local process holds the other end of an accepted loopback TCP connection.
//!
//! In loopback mode every host shares the machine's loopback interface, and Linux gives a
//! connection to any `127.x.y.z` the source address `127.0.0.1` unless the client binds
//! one, so a source address cannot tell the replica's own `mariadbd` from any other local
//! process. The kernel can: the client's side of the connection is a socket in the
//! socket tables of `/proc/net/tcp` and `/proc/net/tcp6`, with `local_address` = the
//! accepted connection's peer and `rem_address` = our listener's address, and its `inode`
//! appears as the link `socket:[inode]` among `/proc/PID/fd/*` of every process holding a
//! descriptor of it (proc(5): `/proc/net/tcp`, `/proc/pid/fd/`). The tables are parsed by
//! the `procfs` crate, which reads their hexadecimal addresses in host byte order per
//! 32-bit word as the kernel prints them.
//!
//! Limits: Linux only (elsewhere every call fails with an error); the tables are those of
//! the calling process's network namespace, so the client must share it; processes of
//! another user are only visible with the privilege to read their `fd` directories
//! (`CAP_SYS_PTRACE`, or the same user). A socket is held by every process that inherited
//! its descriptor (a `fork` without `exec`, or an `exec` without close-on-exec), so a
//! connection can have several owners. These functions read `/proc` synchronously: a few
//! file reads for [`is_owned_by`], a walk of every process for [`owner_pids`].

use std::io;
use std::net::SocketAddr;

use procfs::process::{FDTarget, Process};

/// Whether process `pid` holds the client's side of the connection that our listener at
/// `local` accepted from `peer` (`local` and `peer` as `TcpStream::local_addr` and
/// `TcpStream::peer_addr` of the accepted stream give them). Reads only the socket tables
/// and `pid`'s descriptors: the cheap check when the expected process is known.
///
/// `Ok(false)` when no such connection exists (any more) or `pid` does not exist.
///
/// Errors: `/proc` unreadable (not Linux), or `pid`'s descriptors not readable by this
/// process (another user's process: [`io::ErrorKind::PermissionDenied`]).
pub fn is_owned_by(local: SocketAddr, peer: SocketAddr, pid: u32) -> io::Result<bool> {
    let Some(inode) = client_socket_inode(local, peer)? else {
        return Ok(false);
    };
    match holds_socket(pid, inode) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        other => other,
    }
}

/// The process holding the client's side of the connection our listener at `local`
/// accepted from `peer`: the lowest of [`owner_pids`]. `Ok(None)` when there is no such
/// connection (never made, already gone, or made from another network namespace) or no
/// process this one may inspect holds it.
///
/// Errors: as [`owner_pids`].
pub fn owner_pid(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<u32>> {
    Ok(owner_pids(local, peer)?.into_iter().next())
}

/// Every process holding the client's side of the connection our listener at `local`
/// accepted from `peer`, by ascending pid (several when a descriptor was inherited);
/// empty when there is no such connection. Walks every process's descriptors: use
/// [`is_owned_by`] when the expected process is known. Processes that end during the walk
/// or whose descriptors this process may not read are skipped.
///
/// Errors: `/proc` (its socket tables or its process list) unreadable, e.g. not Linux.
pub fn owner_pids(local: SocketAddr, peer: SocketAddr) -> io::Result<Vec<u32>> {
    let Some(inode) = client_socket_inode(local, peer)? else {
        return Ok(Vec::new());
    };
    let mut owners = Vec::new();
    for process in procfs::process::all_processes().map_err(to_io)? {
        // A process that exited since the listing, or of a user we may not inspect.
        let Ok(process) = process else { continue };
        let Ok(pid) = u32::try_from(process.pid) else {
            continue;
        };
        if process_holds(&process, inode).unwrap_or(false) {
            owners.push(pid);
        }
    }
    owners.sort_unstable();
    Ok(owners)
}

/// The inode of the client's side of the connection `peer` → `local`: the socket whose
/// local address is `peer` and remote address `local`. Looks in the table of `peer`'s
/// family first, then in the other, comparing IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`,
/// what a dual-stack socket shows) as the IPv4 address they carry. Sockets without an
/// inode (`TIME_WAIT` entries show 0) are ignored.
fn client_socket_inode(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<u64>> {
    let (local, peer) = (canonical(local), canonical(peer));
    let tables: [fn() -> procfs::ProcResult<Vec<procfs::net::TcpNetEntry>>; 2] = if peer.is_ipv4() {
        [procfs::net::tcp, procfs::net::tcp6]
    } else {
        [procfs::net::tcp6, procfs::net::tcp]
    };
    for (i, table) in tables.into_iter().enumerate() {
        let entries = match table() {
            Ok(entries) => entries,
            // A kernel without IPv6 has no /proc/net/tcp6; the first table must exist.
            Err(procfs::ProcError::NotFound(_)) if i > 0 => continue,
            Err(e) => return Err(to_io(e)),
        };
        let found = entries.into_iter().find(|e| {
            e.inode != 0
                && canonical(e.local_address) == peer
                && canonical(e.remote_address) == local
        });
        if let Some(e) = found {
            return Ok(Some(e.inode));
        }
    }
    Ok(None)
}

/// `addr` with an IPv4-mapped IPv6 address turned into the IPv4 address, without flow
/// information or scope: the form both socket tables are compared in.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Whether `pid` has a descriptor on socket `inode`. Errors: `NotFound` when `pid` does
/// not exist, `PermissionDenied` when its descriptors may not be read.
fn holds_socket(pid: u32, inode: u64) -> io::Result<bool> {
    let pid = i32::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::NotFound, format!("no process {pid}")))?;
    let process = Process::new(pid).map_err(to_io)?;
    process_holds(&process, inode)
}

fn process_holds(process: &Process, inode: u64) -> io::Result<bool> {
    let fds = process.fd().map_err(to_io)?;
    // A descriptor closed while the directory is read is skipped.
    Ok(fds
        .flatten()
        .any(|fd| matches!(fd.target, FDTarget::Socket(i) if i == inode)))
}

/// A `procfs` error as an `io::Error` of the matching kind.
fn to_io(e: procfs::ProcError) -> io::Error {
    let kind = match &e {
        procfs::ProcError::PermissionDenied(_) => io::ErrorKind::PermissionDenied,
        procfs::ProcError::NotFound(_) => io::ErrorKind::NotFound,
        procfs::ProcError::Io(err, _) => err.kind(),
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_compare_as_ipv4() {
        let v4: SocketAddr = "127.93.40.1:3307".parse().expect("address");
        let mapped: SocketAddr = "[::ffff:127.93.40.1]:3307".parse().expect("address");
        let v6: SocketAddr = "[::1]:3307".parse().expect("address");
        assert_eq!(canonical(mapped), v4);
        assert_eq!(canonical(v4), v4);
        assert_eq!(canonical(v6), v6);
    }
}
