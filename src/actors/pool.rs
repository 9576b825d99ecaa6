//! Starting and stopping the whole actor tree.

use std::path::PathBuf;
use std::sync::Arc;

use ractor::{Actor, ActorRef};
use tokio::sync::oneshot;

use super::cluster::{Cluster, ClusterView};
use super::router::RouterMsg;
use super::supervisor::{PoolSupervisor, SupervisorArgs, SupervisorMsg};
use crate::config::PoolConfig;
use crate::metrics::Metrics;

/// A running pool: the supervisor and the router it spawned.
pub struct Pool {
    supervisor: ActorRef<SupervisorMsg>,
    supervisor_done: tokio::task::JoinHandle<()>,
    router: ActorRef<RouterMsg>,
    metrics: Arc<Metrics>,
    cluster: Option<Cluster>,
}

/// The variable that holds the cluster's shared secret.
pub const CLUSTER_COOKIE: &str = "LLORCH_CLUSTER_COOKIE";

/// Why the pool could not start.
#[derive(Debug, thiserror::Error)]
#[error("the pool failed to start: {0}")]
pub struct PoolStartError(String);

impl Pool {
    /// Spawns the supervisor, which spawns the router and every model actor. Models load in the
    /// background; the router answers 503 or queues until they are ready. With `[cluster]`,
    /// this node also joins its peers (and refuses to start without [`CLUSTER_COOKIE`]).
    pub async fn start(
        config: PoolConfig,
        config_path: Option<PathBuf>,
    ) -> Result<Self, PoolStartError> {
        let cluster_config = config.cluster.clone();
        let cookie = std::env::var(CLUSTER_COOKIE).unwrap_or_default();
        if cluster_config.is_some() && cookie.is_empty() {
            return Err(PoolStartError(format!(
                "[cluster] is set but {CLUSTER_COOKIE} is not: every node needs the cluster's shared secret"
            )));
        }
        let (router_tx, router_rx) = oneshot::channel();
        let metrics = Arc::new(Metrics::new());
        let (supervisor, supervisor_done) = Actor::spawn(
            None,
            PoolSupervisor,
            SupervisorArgs {
                config,
                config_path,
                router_tx,
                metrics: metrics.clone(),
            },
        )
        .await
        .map_err(|err| PoolStartError(err.to_string()))?;
        let router = router_rx
            .await
            .map_err(|_| PoolStartError("the supervisor did not start the router".into()))?;
        let cluster = match &cluster_config {
            Some(config) => Some(
                Cluster::start(
                    config,
                    cookie,
                    router.clone(),
                    supervisor.clone(),
                    metrics.clone(),
                )
                .await
                .map_err(PoolStartError)?,
            ),
            None => None,
        };
        Ok(Self {
            supervisor,
            supervisor_done,
            router,
            metrics,
            cluster,
        })
    }

    /// The supervisor's address (for admin commands).
    pub fn supervisor(&self) -> ActorRef<SupervisorMsg> {
        self.supervisor.clone()
    }

    /// The router's address.
    pub fn router(&self) -> ActorRef<RouterMsg> {
        self.router.clone()
    }

    /// The pool's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// What this node knows of the other nodes, with `[cluster]`.
    pub fn cluster_view(&self) -> Option<ClusterView> {
        self.cluster.as_ref().map(Cluster::view)
    }

    /// The requests this node sends to other nodes, with `[cluster]`.
    pub fn relay(&self) -> Option<crate::actors::cluster::Relay> {
        self.cluster.as_ref().map(Cluster::relay)
    }

    /// Stops every actor; engine threads end after their current step.
    pub async fn stop(self) {
        if let Some(cluster) = &self.cluster {
            cluster.stop();
        }
        self.supervisor.stop(None);
        let _ = self.supervisor_done.await;
    }
}
