//! The `Keygen` gRPC service (`proto/keygen.proto`): batches for the control
//! plane.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::proto::keygen_server::Keygen;
use crate::proto::{GenerateKeysRequest, GenerateKeysResponse};
use crate::service::{KeyService, MAX_BATCH};

pub struct GrpcKeygen {
    pub service: Arc<KeyService>,
}

#[tonic::async_trait]
impl Keygen for GrpcKeygen {
    async fn generate_keys(
        &self,
        request: Request<GenerateKeysRequest>,
    ) -> Result<Response<GenerateKeysResponse>, Status> {
        let span = tracing::info_span!("Keygen/GenerateKeys", count = request.get_ref().count);
        // The caller's trace context travels in the gRPC metadata.
        shortener_common::telemetry::set_parent_from(
            &span,
            &request.metadata().clone().into_headers(),
        );
        self.generate(request.into_inner().count)
            .instrument(span)
            .await
    }
}

impl GrpcKeygen {
    async fn generate(&self, count: u32) -> Result<Response<GenerateKeysResponse>, Status> {
        if !(1..=MAX_BATCH).contains(&count) {
            return Err(Status::invalid_argument(format!(
                "count must be from 1 to {MAX_BATCH}, got {count}"
            )));
        }
        match self.service.generate(count).await {
            Ok((worker, keys)) => {
                metrics::counter!("keygen_grpc_requests_total", "status" => "ok").increment(1);
                Ok(Response::new(GenerateKeysResponse {
                    keys,
                    worker_id: u32::from(worker),
                }))
            }
            Err(e) => {
                metrics::counter!("keygen_grpc_requests_total", "status" => "unavailable")
                    .increment(1);
                Err(Status::unavailable(format!("{}: {e}", e.code())))
            }
        }
    }
}
