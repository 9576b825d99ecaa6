//! The node server's link events, logged: ractor_cluster closes a link whose cookie does not
//! match without a word, so a link that closes before it authenticated is logged here as
//! refused (a wrong `LLORCH_CLUSTER_COOKIE`, or a peer that is not a llorch node).

use std::collections::HashSet;
use std::sync::Mutex;

use ractor_cluster::node::{NodeEventSubscription, NodeServerSessionInformation};

/// Logs links opened, authenticated, refused and closed.
#[derive(Default)]
pub struct LinkLog {
    authenticated: Mutex<HashSet<u64>>,
}

impl NodeEventSubscription for LinkLog {
    fn node_session_opened(&self, link: NodeServerSessionInformation) {
        tracing::debug!(peer = %link.peer_addr, "cluster link opened");
    }

    fn node_session_authenticated(&self, link: NodeServerSessionInformation) {
        if let Ok(mut authenticated) = self.authenticated.lock() {
            authenticated.insert(link.node_id);
        }
        let node = link.peer_name.map(|name| name.name).unwrap_or_default();
        tracing::info!(peer = %link.peer_addr, %node, "cluster link authenticated");
    }

    fn node_session_disconnected(&self, link: NodeServerSessionInformation) {
        let was = self
            .authenticated
            .lock()
            .map(|mut authenticated| authenticated.remove(&link.node_id))
            .unwrap_or(false);
        if was {
            let node = link.peer_name.map(|name| name.name).unwrap_or_default();
            tracing::info!(peer = %link.peer_addr, %node, "cluster link closed");
        } else {
            tracing::warn!(
                peer = %link.peer_addr,
                "cluster link refused: it closed before authenticating (a wrong \
                 LLORCH_CLUSTER_COOKIE, or a peer that is not a llorch node of this cluster)"
            );
        }
    }
}
