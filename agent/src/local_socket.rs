//! The agent's Unix sockets (the Router API, the data plane): who may connect. The file
//! mode (`0660`) admits the agent's user and group; a [`PeerPolicy`] narrows that to
//! listed uids and gids, checked on every connection from the kernel's peer credentials
//! (`SO_PEERCRED`), which a client cannot forge.

use std::path::Path;

use serde::Deserialize;
use tokio::net::{UnixListener, UnixStream};

/// Which peers may connect: any the file mode admits when both lists are empty, else only
/// a process whose uid or primary gid is listed. `SO_PEERCRED` reports the primary gid
/// only, so a supplementary group does not count.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerPolicy {
    /// User ids admitted.
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
    /// Primary group ids admitted.
    #[serde(default)]
    pub allowed_gids: Vec<u32>,
}

impl PeerPolicy {
    /// Whether a peer with these ids may connect.
    #[must_use]
    pub fn admits(&self, uid: u32, gid: u32) -> bool {
        (self.allowed_uids.is_empty() && self.allowed_gids.is_empty())
            || self.allowed_uids.contains(&uid)
            || self.allowed_gids.contains(&gid)
    }
}

/// A bound [`LocalListener`] apart from any runtime, to be served on another.
#[derive(Debug)]
pub struct StdLocalListener {
    inner: std::os::unix::net::UnixListener,
    peers: PeerPolicy,
}

/// A bound socket that hands out only connections its [`PeerPolicy`] admits; the others
/// are closed at once and logged at warn.
#[derive(Debug)]
pub struct LocalListener {
    inner: UnixListener,
    peers: PeerPolicy,
}

impl LocalListener {
    /// Binds at `path` (its directory created, a socket left by an earlier run replaced)
    /// with file mode `0660`: the owner and its group may connect, no one else.
    ///
    /// # Errors
    /// When the directory, the bind or the mode fails.
    pub fn bind(path: &Path, peers: PeerPolicy) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let inner = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        Ok(LocalListener { inner, peers })
    }

    /// The socket apart from this runtime.
    ///
    /// # Errors
    /// When it cannot be taken out of the runtime's reactor.
    pub fn into_std(self) -> std::io::Result<StdLocalListener> {
        Ok(StdLocalListener {
            inner: self.inner.into_std()?,
            peers: self.peers,
        })
    }

    /// A socket from [`LocalListener::into_std`], on the current runtime.
    ///
    /// # Errors
    /// When it cannot be registered with the runtime's reactor.
    pub fn from_std(listener: StdLocalListener) -> std::io::Result<Self> {
        Ok(LocalListener {
            inner: UnixListener::from_std(listener.inner)?,
            peers: listener.peers,
        })
    }

    /// The next admitted connection.
    ///
    /// # Errors
    /// When accepting fails.
    pub async fn accept(&self) -> std::io::Result<UnixStream> {
        loop {
            let (stream, _) = self.inner.accept().await?;
            if self.admitted(&stream) {
                return Ok(stream);
            }
        }
    }

    fn admitted(&self, stream: &UnixStream) -> bool {
        match stream.peer_cred() {
            Ok(cred) if self.peers.admits(cred.uid(), cred.gid()) => true,
            Ok(cred) => {
                tracing::warn!(
                    uid = cred.uid(),
                    gid = cred.gid(),
                    pid = cred.pid(),
                    "refused a local connection: its uid and gid are not allowed"
                );
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "refused a local connection: no peer credentials");
                false
            }
        }
    }
}

impl axum::serve::Listener for LocalListener {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            if self.admitted(&stream) {
                return (stream, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn sockets_admit_the_owner_and_its_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run/api.sock");
        let listener = LocalListener::bind(&path, PeerPolicy::default()).expect("binds");
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o660, "{mode:o}");
        // A socket left by an earlier run is replaced.
        drop(listener);
        LocalListener::bind(&path, PeerPolicy::default()).expect("binds again");
    }

    #[test]
    fn a_policy_admits_listed_uids_or_gids_and_no_list_admits_all() {
        let open = PeerPolicy::default();
        assert!(open.admits(1234, 5678));
        let by_uid = PeerPolicy {
            allowed_uids: vec![1000],
            allowed_gids: Vec::new(),
        };
        assert!(by_uid.admits(1000, 1));
        assert!(!by_uid.admits(1001, 1));
        let by_gid = PeerPolicy {
            allowed_uids: Vec::new(),
            allowed_gids: vec![2000],
        };
        assert!(by_gid.admits(1, 2000));
        assert!(!by_gid.admits(2000, 1), "a uid is not a gid");
    }

    /// Peers are judged by the kernel's credentials of the connecting process.
    #[tokio::test]
    async fn a_peer_whose_ids_are_not_listed_is_hung_up_on() {
        let ours = UnixStream::pair()
            .expect("socketpair")
            .0
            .peer_cred()
            .expect("cred");
        let (uid, gid) = (ours.uid(), ours.gid());
        let dir = tempfile::tempdir().expect("tempdir");
        for (peers, admitted) in [
            (
                PeerPolicy {
                    allowed_uids: vec![uid.wrapping_add(1)],
                    allowed_gids: vec![gid.wrapping_add(1)],
                },
                false,
            ),
            (
                PeerPolicy {
                    allowed_uids: vec![uid.wrapping_add(1)],
                    allowed_gids: vec![gid],
                },
                true,
            ),
        ] {
            let path = dir.path().join("api.sock");
            let listener = LocalListener::bind(&path, peers.clone()).expect("binds");
            let server = tokio::spawn(async move {
                loop {
                    let mut stream = listener.accept().await.expect("accepts");
                    stream.write_all(b"hello").await.expect("writes");
                }
            });
            let mut client = UnixStream::connect(&path).await.expect("connects");
            let mut got = Vec::new();
            let read =
                tokio::time::timeout(std::time::Duration::from_secs(2), client.read_buf(&mut got))
                    .await
                    .expect("answers or hangs up at once");
            server.abort();
            if admitted {
                assert_eq!(got, b"hello", "{peers:?}");
            } else {
                assert!(
                    matches!(read, Ok(0)) || read.is_err(),
                    "{peers:?}: {read:?} {got:?}"
                );
            }
        }
    }
}
