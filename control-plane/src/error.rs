//! The one place where errors become HTTP responses. Client mistakes say
//! what was wrong; dependency trouble is 503; anything else is logged and
//! answered with a generic 500 so internals never leak.

use std::io::Cursor;

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use rocket::http::{ContentType, Header, Status};
use rocket::request::Request;
use rocket::response::{self, Responder, Response};
use shortener_common::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{1}")]
    BadRequest(&'static str, String),
    #[error("a valid API key is required: send `Authorization: Bearer <key>`")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{1}")]
    Unprocessable(&'static str, String),
    #[error("the request body is larger than {0} bytes")]
    PayloadTooLarge(u64),
    #[error("{1}")]
    Unavailable(&'static str, String),
    #[error("this API key is over its request rate; retry after {0} s")]
    RateLimited(u64),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest("invalid_request", message.into())
    }

    pub fn database_down(detail: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %detail, "PostgreSQL is unavailable");
        Self::Unavailable(
            "database_unavailable",
            "the database is unavailable; retry shortly".into(),
        )
    }

    pub fn status(&self) -> Status {
        match self {
            Self::BadRequest(..) => Status::BadRequest,
            Self::Unauthorized => Status::Unauthorized,
            Self::NotFound(_) => Status::NotFound,
            Self::Conflict(_) => Status::Conflict,
            Self::Unprocessable(..) => Status::UnprocessableEntity,
            Self::PayloadTooLarge(_) => Status::PayloadTooLarge,
            Self::Unavailable(..) => Status::ServiceUnavailable,
            Self::RateLimited(_) => Status::TooManyRequests,
            Self::Internal(_) => Status::InternalServerError,
        }
    }

    pub fn body(&self) -> ErrorBody {
        let code: &'static str = match self {
            Self::BadRequest(code, _)
            | Self::Unprocessable(code, _)
            | Self::Unavailable(code, _) => code,
            Self::Unauthorized => "unauthorized",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::RateLimited(_) => "rate_limited",
            Self::Internal(_) => "internal",
        };
        let message = match self {
            Self::Internal(_) => "internal error".to_owned(),
            other => other.to_string(),
        };
        ErrorBody::new(code, message)
    }
}

impl From<DieselError> for ApiError {
    fn from(error: DieselError) -> Self {
        match &error {
            DieselError::DatabaseError(
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
                _,
            ) => Self::database_down(error),
            DieselError::DatabaseError(DatabaseErrorKind::Unknown, info)
                if info.message().contains("terminating connection")
                    || info.message().contains("server closed") =>
            {
                Self::database_down(error)
            }
            _ => Self::Internal(error.to_string()),
        }
    }
}

impl From<diesel::r2d2::PoolError> for ApiError {
    fn from(error: diesel::r2d2::PoolError) -> Self {
        Self::database_down(error)
    }
}

impl<'r> Responder<'r, 'static> for ApiError {
    fn respond_to(self, request: &'r Request<'_>) -> response::Result<'static> {
        if let Self::Internal(detail) = &self {
            tracing::error!(error = %detail, uri = %request.uri(), "request failed");
        }
        let body = self.body().to_json();
        let mut response = Response::build();
        response
            .status(self.status())
            .header(ContentType::JSON)
            .sized_body(body.len(), Cursor::new(body));
        if matches!(self, Self::Unauthorized) {
            response.header(Header::new("WWW-Authenticate", "Bearer"));
        }
        if let Self::RateLimited(seconds) = self {
            response.header(Header::new("Retry-After", seconds.to_string()));
        }
        response.ok()
    }
}
