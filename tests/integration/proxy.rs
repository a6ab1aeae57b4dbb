//! A TCP proxy on 127.0.0.1 between the projector and a PostgreSQL port, to break the network
//! on purpose: cut every connection, black-hole the traffic for a while, or freeze the
//! connections of the moment for good.
//!
//! Each connection is two pump threads (one per direction). Every thread polls a stop flag
//! at least every [`TICK`], so all of them end when the proxy is dropped.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often a waiting thread looks at the stop flag.
const TICK: Duration = Duration::from_millis(50);

/// A proxy from a port of its own on 127.0.0.1 to `127.0.0.1:upstream`.
pub struct Proxy {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled whenever traffic may flow again.
    flowing: Condvar,
    stopping: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Every byte of every connection, old and new, waits.
    black_hole: bool,
    connections: Vec<Arc<Connection>>,
    pumps: Vec<JoinHandle<()>>,
    /// Connections accepted so far.
    accepted: usize,
}

struct Connection {
    client: TcpStream,
    server: TcpStream,
    /// This connection's bytes (and its close) wait, while new connections pass.
    frozen: AtomicBool,
    closed: AtomicBool,
}

impl Proxy {
    /// A proxy in pass mode to the server listening on `127.0.0.1:upstream`.
    pub fn to(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy on 127.0.0.1");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let port = listener.local_addr().expect("the proxy's address").port();
        let shared = Arc::new(Shared::default());
        let upstream = SocketAddr::from(([127, 0, 0, 1], upstream));
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("test-proxy-accept".into())
                .spawn(move || accept(listener, upstream, shared))
                .expect("start the proxy")
        };
        Proxy {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `url` with its `host:port` replaced by the proxy's.
    pub fn url(&self, upstream_url: &str) -> String {
        let (scheme, rest) = upstream_url
            .split_once("://")
            .expect("a URL such as postgres://user@host:port/db");
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let user = authority.rfind('@').map_or("", |at| &authority[..=at]);
        format!("{scheme}://{user}127.0.0.1:{}{tail}", self.port)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.lock().accepted
    }

    /// Closes every current connection, both ways; new connections are still accepted.
    /// Returns how many were open.
    pub fn cut(&self) -> usize {
        let mut state = self.shared.lock();
        let open: Vec<_> = state
            .connections
            .drain(..)
            .filter(|c| !c.closed.load(Ordering::SeqCst))
            .collect();
        for connection in &open {
            connection.close();
        }
        self.shared.flowing.notify_all();
        open.len()
    }

    /// Stalls every connection, current and new, both ways, closing none of them, until
    /// [`heal`](Self::heal): as a network that drops every packet, then comes back and
    /// resumes where it left off.
    pub fn black_hole(&self) {
        self.shared.lock().black_hole = true;
    }

    /// Stalls the current connections for good (until [`heal`](Self::heal) or drop), their
    /// closes included, so the server never hears that a client went away; new connections
    /// pass.
    pub fn freeze(&self) {
        for connection in &self.shared.lock().connections {
            connection.frozen.store(true, Ordering::SeqCst);
        }
    }

    /// Back to pass mode: whatever waited flows on.
    pub fn heal(&self) {
        let mut state = self.shared.lock();
        state.black_hole = false;
        for connection in &state.connections {
            connection.frozen.store(false, Ordering::SeqCst);
        }
        self.shared.flowing.notify_all();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.flowing.notify_all();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let (connections, pumps) = {
            let mut state = self.shared.lock();
            (
                std::mem::take(&mut state.connections),
                std::mem::take(&mut state.pumps),
            )
        };
        for connection in connections {
            connection.close();
        }
        for pump in pumps {
            let _ = pump.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Waits until `connection` may pass bytes; false when the proxy stops or the connection
    /// was cut meanwhile.
    fn wait_until_flowing(&self, connection: &Connection) -> bool {
        let mut state = self.lock();
        loop {
            if self.stopping() || connection.closed.load(Ordering::SeqCst) {
                return false;
            }
            if !state.black_hole && !connection.frozen.load(Ordering::SeqCst) {
                return true;
            }
            state = self
                .flowing
                .wait_timeout(state, TICK)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }
}

impl Connection {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }
}

fn accept(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    while !shared.stopping() {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(error) if error.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(_) => continue,
        };
        let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) else {
            // Nothing listens upstream: the client sees its connection closed.
            continue;
        };
        let streams = (|| {
            client.set_nonblocking(false)?;
            for stream in [&client, &server] {
                stream.set_read_timeout(Some(TICK))?;
                stream.set_nodelay(true)?;
            }
            Ok::<_, std::io::Error>((client.try_clone()?, server.try_clone()?))
        })();
        let Ok((client_reader, server_reader)) = streams else {
            continue;
        };
        let connection = Arc::new(Connection {
            client,
            server,
            frozen: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        let mut state = shared.lock();
        state.accepted += 1;
        state
            .connections
            .retain(|c| !c.closed.load(Ordering::SeqCst));
        state.connections.push(Arc::clone(&connection));
        state.pumps.retain(|pump| !pump.is_finished());
        for (from, to) in [
            (client_reader, ToSide::Server),
            (server_reader, ToSide::Client),
        ] {
            let shared = Arc::clone(&shared);
            let connection = Arc::clone(&connection);
            if let Ok(pump) = std::thread::Builder::new()
                .name("test-proxy-pump".into())
                .spawn(move || pump(from, to, &connection, &shared))
            {
                state.pumps.push(pump);
            }
        }
    }
}

#[derive(Clone, Copy)]
enum ToSide {
    Server,
    Client,
}

/// Copies bytes from `from` to the other side of `connection` while it may flow, and passes
/// an end of stream on; an error closes the connection both ways.
fn pump(mut from: TcpStream, to: ToSide, connection: &Connection, shared: &Shared) {
    let mut to_stream = match to {
        ToSide::Server => &connection.server,
        ToSide::Client => &connection.client,
    };
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if !shared.wait_until_flowing(connection) {
            break;
        }
        match from.read(&mut buffer) {
            Ok(0) => {
                // The end of the stream waits too: a frozen client's close never reaches
                // the server.
                if shared.wait_until_flowing(connection) {
                    let _ = to_stream.shutdown(Shutdown::Write);
                    return;
                }
                break;
            }
            Ok(read) => {
                if !shared.wait_until_flowing(connection)
                    || to_stream.write_all(&buffer[..read]).is_err()
                {
                    break;
                }
            }
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if !shared.stopping() {
        connection.close();
    }
}

#[test]
fn a_proxy_passes_cuts_black_holes_and_heals() {
    use projector::postgres::{Client, NoTls};
    let url = crate::util::database_url();
    let Some(port) = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split(['/', '?']).next())
        .and_then(|authority| authority.rsplit(':').next())
        .and_then(|port| port.parse::<u16>().ok())
    else {
        // DATABASE_URL names no port (a socket, key=value pairs): nothing to proxy.
        return;
    };
    let proxy = Proxy::to(port);
    let through = proxy.url(&url);
    let mut client = Client::connect(&through, NoTls).expect("connect through the proxy");
    let one = |client: &mut Client| -> Result<i32, projector::postgres::Error> {
        Ok(client.query_one("SELECT 1", &[])?.get(0))
    };
    assert_eq!(one(&mut client).expect("pass"), 1);

    assert_eq!(proxy.cut(), 1);
    assert!(one(&mut client).is_err(), "a cut connection fails");
    let mut client = Client::connect(&through, NoTls).expect("new connections pass a cut");

    proxy.black_hole();
    let (sender, receiver) = std::sync::mpsc::channel();
    let waiting = std::thread::spawn(move || sender.send(one(&mut client).is_ok()));
    assert!(
        receiver.recv_timeout(Duration::from_millis(500)).is_err(),
        "a black hole stalls the query"
    );
    proxy.heal();
    assert_eq!(
        receiver.recv_timeout(Duration::from_secs(10)),
        Ok(true),
        "the query goes through once healed"
    );
    let _ = waiting.join();
    assert_eq!(proxy.accepted(), 2);

    // A frozen connection's close never reaches the server: its session stays.
    let named = format!("{through}?application_name=frozen_{}", std::process::id());
    let frozen = Client::connect(&named, NoTls).expect("connect before the freeze");
    proxy.freeze();
    drop(frozen);
    let mut admin = crate::util::admin();
    let mut sessions = || -> i64 {
        admin
            .query_one(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&format!("frozen_{}", std::process::id())],
            )
            .expect("count sessions")
            .get(0)
    };
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sessions(), 1, "the server still holds the frozen session");
    let mut fresh = Client::connect(&through, NoTls).expect("new connections pass a freeze");
    assert_eq!(one(&mut fresh).expect("a fresh connection works"), 1);
    drop(proxy);
    crate::util::eventually("the frozen session to end", Duration::from_secs(10), || {
        sessions() == 0
    });
}
