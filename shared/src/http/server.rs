//! The API over plain HTTP (the local runner and tests): every request goes
//! to the same [`Service::handle`] the Lambda function calls.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;

use super::{ApiResponse, MAX_BODY_BYTES, Service};
use crate::http::ApiError;

async fn handle(State(service): State<Arc<Service>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    let response = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(bytes) => {
            let request = super::request(parts.method, &path_and_query, parts.headers, bytes);
            service.handle(request).await
        }
        Err(_) => ApiResponse::error(
            &ApiError::invalid_input(format!(
                "request body is larger than {MAX_BODY_BYTES} bytes"
            )),
            parts.uri.path(),
            &uuid::Uuid::new_v4().simple().to_string(),
        ),
    };
    let mut out = Response::new(Body::from(response.body));
    *out.status_mut() = response.status;
    out.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(response.content_type),
    );
    if let Some(id) = response
        .request_id
        .and_then(|id| http::HeaderValue::from_str(&id).ok())
    {
        out.headers_mut().insert("x-request-id", id);
    }
    out
}

pub fn router(service: Arc<Service>) -> Router {
    Router::new()
        .fallback(handle)
        .with_state(service)
        .layer(axum::extract::DefaultBodyLimit::disable())
}

/// Serves until `shutdown` resolves; returns the bound address at once.
pub async fn serve(
    service: Arc<Service>,
    listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let local = listener.local_addr()?;
    let app = router(service);
    let handle = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(anyhow::Error::from)
    });
    Ok((local, handle))
}
