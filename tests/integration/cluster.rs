//! A private, throw-away PostgreSQL cluster per test, for faults that would disturb other
//! tests: restarts, crashes, a server that is gone for a while.
//!
//! The server binaries are found as `scripts/lib/pg.sh` finds them (`PATH`,
//! `pg_config --bindir`, `/usr/lib/postgresql/*/bin`). As root the server runs as the
//! `postgres` user (`runuser -u postgres`); otherwise as the current user.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// How long a start or a stop may take before the test fails.
const PG_CTL_TIMEOUT_SECONDS: &str = "60";

/// A PostgreSQL cluster of its own in a fresh temporary directory, listening on 127.0.0.1 only
/// (no Unix socket), with `fsync` off. Stopped and removed when dropped.
pub struct Cluster {
    bindir: PathBuf,
    /// The temporary directory: `data/` and `server.log` in it.
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl Cluster {
    /// Initialises and starts a new cluster; `name` is part of its directory's name.
    pub fn start(name: &str) -> Cluster {
        let cluster = Cluster::empty_dir(name);
        let data = cluster.data();
        cluster.run_checked(
            "initdb",
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
        );
        cluster.start_on_a_free_port()
    }

    /// A physical streaming replica of `primary` (`pg_basebackup -R`), started on a port of
    /// its own: read-only, replaying the primary's WAL as it streams in.
    pub fn replica_of(primary: &Cluster, name: &str) -> Cluster {
        let cluster = Cluster::empty_dir(&format!("{name}-replica"));
        let data = cluster.data();
        let port = primary.port.to_string();
        cluster.run_checked(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-D",
                &data,
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ],
        );
        cluster.start_on_a_free_port()
    }

    /// The cluster's directory, created empty (and owned by `postgres` when running as root).
    fn empty_dir(name: &str) -> Cluster {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "projector-cluster-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the cluster's directory");
        let as_postgres = running_as_root();
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(&dir)
                .status()
                .expect("run chown");
            assert!(status.success(), "chown the cluster directory to postgres");
        }
        Cluster {
            bindir: server_bindir(),
            dir,
            port: 0,
            as_postgres,
        }
    }

    /// Starts the initialised cluster on a port nothing listens on.
    fn start_on_a_free_port(mut self) -> Cluster {
        // A port is picked by binding to port 0 and letting it go; another process may take it
        // in between, so a start that fails is tried again with another port.
        for attempt in 1..=3 {
            self.port = free_port();
            self.write_settings();
            let output = self.pg_ctl(&["start", "-w", "-t", PG_CTL_TIMEOUT_SECONDS]);
            if output.status.success() {
                return self;
            }
            assert!(
                attempt < 3 && self.log().contains("Address already in use"),
                "could not start PostgreSQL in {}: {}\n{}",
                self.dir.display(),
                crate::util::text(&output.stderr),
                self.log()
            );
        }
        unreachable!("the loop above returns or fails")
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The TCP port the server listens on (the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `pg_ctl restart -m fast`: sessions are terminated, transactions in flight roll back,
    /// and the server comes back on the same port after a clean shutdown.
    pub fn restart_fast(&self) {
        self.restart("fast");
    }

    /// `pg_ctl restart -m immediate`: the server stops without a shutdown checkpoint and
    /// comes back through crash recovery.
    pub fn restart_immediate(&self) {
        self.restart("immediate");
    }

    /// Stops the server (`-m fast`); [`start_again`](Self::start_again) brings it back on the
    /// same port.
    pub fn stop(&self) {
        self.pg_ctl_checked(&["stop", "-m", "fast", "-w", "-t", PG_CTL_TIMEOUT_SECONDS]);
    }

    /// Starts the stopped server again, on the same port.
    pub fn start_again(&self) {
        self.pg_ctl_checked(&["start", "-w", "-t", PG_CTL_TIMEOUT_SECONDS]);
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn restart(&self, mode: &str) {
        self.pg_ctl_checked(&["restart", "-m", mode, "-w", "-t", PG_CTL_TIMEOUT_SECONDS]);
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// Settings in `postgresql.conf` itself, so that every start and restart uses them.
    /// `fsync = off` loses nothing when only the server goes down (the kernel keeps what was
    /// written); `synchronous_commit` stays on, since off would let `-m immediate` lose
    /// commits that were acknowledged, which no projector could make up for.
    fn write_settings(&self) {
        let settings = format!(
            "\n# written by the tests' Cluster\n\
             listen_addresses = '127.0.0.1'\n\
             port = {}\n\
             unix_socket_directories = ''\n\
             fsync = off\n\
             full_page_writes = off\n\
             max_connections = 100\n\
             max_prepared_transactions = 20\n\
             shared_buffers = 16MB\n",
            self.port
        );
        let path = Path::new(&self.data()).join("postgresql.conf");
        let mut conf = std::fs::read_to_string(&path).expect("read postgresql.conf");
        if let Some(earlier) = conf.find("\n# written by the tests' Cluster\n") {
            conf.truncate(earlier);
        }
        conf.push_str(&settings);
        std::fs::write(&path, conf).expect("write postgresql.conf");
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        let data = self.data();
        let log = self.dir.join("server.log").display().to_string();
        let mut all = vec!["-D", &data, "-l", &log, "-s"];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all)
    }

    fn pg_ctl_checked(&self, args: &[&str]) {
        let output = self.pg_ctl(args);
        assert!(
            output.status.success(),
            "pg_ctl {args:?} failed: {}\n{}",
            crate::util::text(&output.stderr),
            self.log()
        );
    }

    /// Runs a server binary as the cluster's owner, from `/` (which every user can read).
    fn run(&self, program: &str, args: &[&str]) -> Output {
        let program = self.bindir.join(program);
        let mut command = if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        command
            .args(args)
            .current_dir("/")
            .stdin(Stdio::null())
            .output()
            .expect("run a PostgreSQL server binary")
    }

    fn run_checked(&self, program: &str, args: &[&str]) {
        let output = self.run(program, args);
        assert!(
            output.status.success(),
            "{program} failed: {}{}",
            crate::util::text(&output.stdout),
            crate::util::text(&output.stderr)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.port != 0 {
            let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|output| crate::util::text(&output.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind a free port on 127.0.0.1")
        .port()
}

/// The directory holding `initdb`, `pg_ctl` and `pg_basebackup`.
fn server_bindir() -> PathBuf {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    let mut candidates = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        candidates.push(PathBuf::from(crate::util::text(&output.stdout).trim()));
    }
    let mut versioned: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
                .collect()
        })
        .unwrap_or_default();
    // The newest version first: 15 before 9.6, by number, not by text.
    versioned.sort_by_key(|dir| {
        let version = dir
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.split('.').next())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0);
        std::cmp::Reverse(version)
    });
    candidates.extend(versioned);
    // A symlinked pg_ctl (in /usr/local/bin, say) points into the real directory, which also
    // holds pg_basebackup.
    let real = |dir: PathBuf| {
        std::fs::canonicalize(dir.join("pg_ctl"))
            .ok()
            .and_then(|pg_ctl| pg_ctl.parent().map(Path::to_path_buf))
            .unwrap_or(dir)
    };
    candidates
        .into_iter()
        .find(|dir| has_server(dir))
        .map(real)
        .expect("PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql")
}

#[test]
fn a_cluster_keeps_its_port_and_its_data_across_restarts_and_stops() {
    let cluster = Cluster::start("itself");
    let connect = || {
        projector::postgres::Client::connect(&cluster.url(), projector::postgres::NoTls)
            .expect("connect to the cluster")
    };
    connect()
        .batch_execute("CREATE TABLE kept (n INT); INSERT INTO kept VALUES (1)")
        .expect("write");
    cluster.restart_fast();
    cluster.restart_immediate();
    cluster.stop();
    assert!(
        std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], cluster.port()).into(),
            Duration::from_secs(1)
        )
        .is_err(),
        "a stopped cluster refuses connections"
    );
    cluster.start_again();
    let kept: i64 = connect()
        .query_one("SELECT COUNT(*) FROM kept", &[])
        .expect("read")
        .get(0);
    assert_eq!(kept, 1);
    let dir = cluster.dir.clone();
    drop(cluster);
    assert!(!dir.exists(), "the cluster's directory is removed");
}
