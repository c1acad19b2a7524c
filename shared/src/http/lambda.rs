//! API Gateway (HTTP API v2 / REST / ALB) events to [`ApiRequest`] and back.

use bytes::Bytes;
use lambda_http::{Body, Request, RequestExt, Response};

use super::{ApiRequest, ApiResponse, Service};

pub fn from_lambda(request: Request) -> ApiRequest {
    let raw_path = request.raw_http_path().to_string();
    let query = request.uri().query().map(str::to_string);
    let (parts, body) = request.into_parts();
    let path = if raw_path.is_empty() {
        parts.uri.path().to_string()
    } else {
        raw_path
    };
    let body = match body {
        Body::Empty => Bytes::new(),
        Body::Text(text) => Bytes::from(text),
        Body::Binary(bytes) => Bytes::from(bytes),
        // Other body kinds never carry a JSON request.
        _ => Bytes::new(),
    };
    ApiRequest {
        method: parts.method,
        path,
        query,
        headers: parts.headers,
        body,
    }
}

pub fn to_lambda(response: ApiResponse) -> Response<Body> {
    // API Gateway passes binary bodies (Arrow) base64-encoded.
    let body = match response.content_type {
        super::ARROW_STREAM => Body::Binary(response.body),
        _ => Body::Text(String::from_utf8_lossy(&response.body).into_owned()),
    };
    let mut out = Response::new(body);
    *out.status_mut() = response.status;
    if let Some(id) = response
        .request_id
        .as_deref()
        .and_then(|id| http::HeaderValue::from_str(id).ok())
    {
        out.headers_mut().insert("x-request-id", id);
    }
    out.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(response.content_type),
    );
    out
}

/// The API function's handler: one call per request.
pub async fn handle(
    service: &Service,
    request: Request,
) -> Result<Response<Body>, lambda_http::Error> {
    Ok(to_lambda(service.handle(from_lambda(request)).await))
}
