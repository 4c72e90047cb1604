//! The gRPC face of the router: `edgewise.agent.v1.Router` over a [`LocalRouter`].

use std::pin::Pin;
use std::sync::Arc;

use edgewise_proto::router::router_server::Router;
use edgewise_proto::router::{
    DecideRequest, DecideResponse, ModelsSnapshot, Outcome, ReportResponse, WatchModelsRequest,
};
use futures_util::{Stream, StreamExt};
use tokio_stream::wrappers::WatchStream;
use tonic::{Status, async_trait};

use super::LocalRouter;

/// The gRPC face of a [`LocalRouter`].
#[derive(Debug, Clone)]
pub struct RouterService {
    router: Arc<LocalRouter>,
}

impl RouterService {
    /// Wraps a router.
    #[must_use]
    pub fn new(router: Arc<LocalRouter>) -> Self {
        RouterService { router }
    }
}

type ModelsStream = Pin<Box<dyn Stream<Item = Result<ModelsSnapshot, Status>> + Send>>;

#[async_trait]
impl Router for RouterService {
    async fn decide(
        &self,
        request: tonic::Request<DecideRequest>,
    ) -> Result<tonic::Response<DecideResponse>, Status> {
        self.router
            .decide(request.get_ref())
            .map(tonic::Response::new)
            .map_err(Status::from)
    }

    async fn report(
        &self,
        request: tonic::Request<Outcome>,
    ) -> Result<tonic::Response<ReportResponse>, Status> {
        self.router
            .report(request.get_ref())
            .await
            .map_err(Status::from)?;
        Ok(tonic::Response::new(ReportResponse {}))
    }

    type WatchModelsStream = ModelsStream;

    async fn watch_models(
        &self,
        _request: tonic::Request<WatchModelsRequest>,
    ) -> Result<tonic::Response<Self::WatchModelsStream>, Status> {
        let stream = WatchStream::new(self.router.watch_models()).map(|view| {
            Ok(ModelsSnapshot {
                models: view.models.values().cloned().collect(),
            })
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}
