//! A real `clickhouse-server` run as a child process with a generated configuration, for
//! the dev stack and the tests. Production points at any ClickHouse by URL instead.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No server binary on PATH.
    #[error(
        "clickhouse-server is not installed: install it (Debian: `apt-get install -y clickhouse-server`) \
         or pass --clickhouse-url to use a running ClickHouse"
    )]
    NotInstalled,
    /// Files or ports.
    #[error("starting clickhouse-server: {0}")]
    Io(#[from] std::io::Error),
    /// It did not answer /ping in time.
    #[error("clickhouse-server did not become ready within {0:?}; see {1}")]
    NotReady(Duration, PathBuf),
}

/// A running server and where its data lives.
#[derive(Debug)]
pub struct ClickHouseServer {
    dir: PathBuf,
    http_port: u16,
    tcp_port: u16,
    child: Option<Child>,
}

fn free_port() -> std::io::Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join("clickhouse-server"))
        .find(|p| p.is_file())
}

impl ClickHouseServer {
    /// Starts a server keeping its data under `dir`, on free loopback ports.
    ///
    /// # Errors
    /// [`Error::NotInstalled`] with the fix when there is no server binary.
    pub async fn start(dir: &Path) -> Result<Self, Error> {
        let mut server = ClickHouseServer {
            // The server runs in `dir` and its configuration names paths under it: a
            // relative `dir` would be resolved twice.
            dir: std::path::absolute(dir)?,
            http_port: free_port()?,
            tcp_port: free_port()?,
            child: None,
        };
        server.spawn().await?;
        Ok(server)
    }

    fn config(&self) -> String {
        let d = self.dir.display();
        format!(
            r#"<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>{d}/log/clickhouse-server.log</log>
        <errorlog>{d}/log/clickhouse-server.err.log</errorlog>
        <size>10M</size>
        <count>2</count>
    </logger>
    <http_port>{http}</http_port>
    <tcp_port>{tcp}</tcp_port>
    <listen_host>127.0.0.1</listen_host>
    <path>{d}/data/</path>
    <tmp_path>{d}/tmp/</tmp_path>
    <user_files_path>{d}/user_files/</user_files_path>
    <format_schema_path>{d}/format_schemas/</format_schema_path>
    <users_config>{d}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>268435456</mark_cache_size>
    <max_concurrent_queries>100</max_concurrent_queries>
</yandex>
"#,
            http = self.http_port,
            tcp = self.tcp_port,
        )
    }

    async fn spawn(&mut self) -> Result<(), Error> {
        let bin = binary().ok_or(Error::NotInstalled)?;
        for sub in ["log", "data", "tmp", "user_files", "format_schemas"] {
            std::fs::create_dir_all(self.dir.join(sub))?;
        }
        std::fs::write(self.dir.join("config.xml"), self.config())?;
        std::fs::write(self.dir.join("users.xml"), USERS)?;
        let child = Command::new(bin)
            .arg(format!(
                "--config-file={}",
                self.dir.join("config.xml").display()
            ))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(30)).await
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                break; // exited: report below
            }
            if ping(self.http_port).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(Error::NotReady(
            timeout,
            self.dir.join("log/clickhouse-server.err.log"),
        ))
    }

    /// `http://127.0.0.1:<port>`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// The native-protocol port (for `clickhouse-client`).
    #[must_use]
    pub fn tcp_port(&self) -> u16 {
        self.tcp_port
    }

    /// Stops the server (SIGKILL: a crash, as far as the data is concerned).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts it again on the same ports and data.
    ///
    /// # Errors
    /// As [`ClickHouseServer::start`].
    pub async fn restart(&mut self) -> Result<(), Error> {
        self.stop().await;
        self.spawn().await
    }
}

async fn ping(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if s.write_all(b"GET /ping HTTP/1.0\r\n\r\n").await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).contains("Ok.")
}

/// One passwordless `default` user on loopback: the dev stack and tests only.
const USERS: &str = r#"<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
            <max_memory_usage>4000000000</max_memory_usage>
            <load_balancing>random</load_balancing>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
"#;
