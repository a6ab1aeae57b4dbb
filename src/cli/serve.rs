//! `--metrics-addr`: a small HTTP server on its own thread for `/metrics`, `/health/live` and
//! `/health/ready`.

use std::sync::Arc;
use std::thread::JoinHandle;

use log::{debug, info};
use projector::{Error, Health, Metrics};
use tiny_http::{Header, Request, Response, Server};

/// The server, serving until dropped.
pub(crate) struct MetricsServer {
    server: Arc<Server>,
    thread: Option<JoinHandle<()>>,
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

/// Serves `metrics` on `server` from a thread of its own; `/health/ready` allows `max_lag`.
pub(crate) fn serve(
    server: Arc<Server>,
    metrics: Metrics,
    max_lag: i64,
) -> Result<MetricsServer, Error> {
    if let Some(address) = server.server_addr().to_ip() {
        info!("serving /metrics, /health/live and /health/ready at http://{address}");
    }
    let serving = Arc::clone(&server);
    let thread = std::thread::Builder::new()
        .name("projector-metrics".into())
        .spawn(move || {
            for request in serving.incoming_requests() {
                answer(request, &metrics, max_lag);
            }
        })
        .map_err(|_| Error::ThreadPanicked {
            thread: "projector-metrics".into(),
        })?;
    Ok(MetricsServer {
        server,
        thread: Some(thread),
    })
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
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
