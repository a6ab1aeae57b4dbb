//! `--metrics-addr`: a small HTTP server for `/metrics`, `/health/live` and `/health/ready`,
//! on a few threads of its own, so that a liveness probe is answered while a scrape waits on the
//! database (one scrape asks it at a time, within its statement timeout; see `Metrics`).

use std::sync::Arc;
use std::thread::JoinHandle;

use log::{debug, info};
use projector::{Error, Health, Metrics};
use tiny_http::{Header, Request, Response, Server};

/// Requests served at once: enough for a liveness probe, a readiness probe and two scrapes.
const SERVING_THREADS: usize = 4;

/// The server, serving until dropped.
pub(crate) struct MetricsServer {
    server: Arc<Server>,
    threads: Vec<JoinHandle<()>>,
}

/// Listens at `address` (given by `flag`), before anything starts: an address that cannot be
/// listened on is a configuration error.
pub(crate) fn listen(flag: &str, address: &str) -> Result<Arc<Server>, Error> {
    Server::http(address.trim()).map(Arc::new).map_err(|error| {
        Error::invalid_setting(
            flag,
            address,
            format!(
                "cannot listen there ({error}): give HOST:PORT of a free port on this \
                     machine, such as 127.0.0.1:9464"
            ),
        )
    })
}

/// Serves `metrics` on `server` from [`SERVING_THREADS`] threads of its own; `/health/ready`
/// allows `max_lag`.
pub(crate) fn serve(
    server: Arc<Server>,
    metrics: Metrics,
    max_lag: i64,
) -> Result<MetricsServer, Error> {
    if let Some(address) = server.server_addr().to_ip() {
        info!("serving /metrics, /health/live and /health/ready at http://{address}");
    }
    let mut serving = MetricsServer {
        server,
        threads: Vec::with_capacity(SERVING_THREADS),
    };
    for n in 0..SERVING_THREADS {
        let server = Arc::clone(&serving.server);
        let metrics = metrics.clone();
        let name = format!("projector-metrics-{n}");
        // On failure, dropping `serving` stops the threads already started.
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                for request in server.incoming_requests() {
                    answer(request, &metrics, max_lag);
                }
            })
            .map_err(|_| Error::ThreadPanicked { thread: name })?;
        serving.threads.push(thread);
    }
    Ok(serving)
}

fn answer(request: Request, metrics: &Metrics, max_lag: i64) {
    let path = request.url().split('?').next().unwrap_or("").to_owned();
    debug!("metrics server: {} {path}", request.method());
    let response = match path.as_str() {
        "/metrics" => text(
            200,
            metrics.render(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        "/health/live" => health(metrics.live()),
        "/health/ready" => health(metrics.ready(max_lag)),
        _ => text(
            404,
            "not found: try /metrics, /health/live or /health/ready\n".into(),
            "text/plain; charset=utf-8",
        ),
    };
    // A client that went away is no concern of the projector's.
    let _ = request.respond(response);
}

fn health(health: Health) -> Response<std::io::Cursor<Vec<u8>>> {
    let status = if health.ok { 200 } else { 503 };
    text(status, health.body, "application/json")
}

fn text(status: u16, body: String, content_type: &str) -> Response<std::io::Cursor<Vec<u8>>> {
    let response = Response::from_string(body).with_status_code(status);
    match Header::from_bytes("Content-Type", content_type) {
        Ok(header) => response.with_header(header),
        Err(()) => response,
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        // Each call lets one thread out of its wait for a request.
        for _ in &self.threads {
            self.server.unblock();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
