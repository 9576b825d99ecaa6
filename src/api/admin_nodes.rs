//! Evict and reload across a cluster: an operation on a model runs on every node that has it
//! (this one and each peer whose listing names it), or on the one `?node=` names; each
//! outcome carries its `node`.

use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::admin::{answer, local};
use super::error::ApiError;
use super::AppState;
use crate::actors::admin::AdminError;
use crate::actors::cluster::{remote_admin, RemoteAdmin, RemoteAnswer};

/// Carries out `op` where `node` says (every node that has the model when `None`).
pub(super) async fn carry_out(
    state: &AppState,
    op: RemoteAdmin,
    node: Option<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let name = op.name().to_string();
    let Some(cluster) = &state.cluster else {
        if node.is_some() {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                Some("node"),
                "this daemon is not in a cluster (no [cluster] in pool.toml): leave out node",
            ));
        }
        let (command, wait) = op.command();
        return Ok(answer(local(state, command, wait).await?, wait));
    };
    let here = cluster.node().to_string();
    let remotes = match node.as_deref() {
        None => cluster.nodes_with(&name),
        Some(n) if n == here => Vec::new(),
        Some(n) if cluster.nodes().iter().any(|known| known == n) => vec![n.to_string()],
        Some(n) => {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "not_found_error",
                code: "node_not_found",
                param: Some("node".to_string()),
                message: format!("no node {n:?} in this cluster"),
            })
        }
    };
    let here_too = node.as_deref().is_none_or(|n| n == here);
    let wait = op.wait();
    let (command, _) = op.clone().command();
    let on_this_node = async {
        match here_too {
            true => Some(local(state, command, wait).await),
            false => None,
        }
    };
    let on_peers = futures::future::join_all(remotes.iter().map(|n| remote_admin(n, &op)));
    let (mine, theirs) = tokio::join!(on_this_node, on_peers);
    let failed = |node: &str, error: String| json!({"name": name, "action": "failed", "error": error, "node": node});
    let mut models = Vec::new();
    match mine {
        Some(Ok(outcomes)) => models.extend(tagged(outcomes, &here)),
        Some(Err(err)) if err.code == "model_not_found" => {}
        Some(Err(err)) if remotes.is_empty() => return Err(err),
        Some(Err(err)) => models.push(failed(&here, err.message)),
        None => {}
    }
    for (node, answer) in remotes.iter().zip(theirs) {
        match answer {
            RemoteAnswer::Done(outcomes) => models.extend(tagged(outcomes, node)),
            RemoteAnswer::NotFound(_) => {}
            RemoteAnswer::Refused(error) => models.push(failed(node, error)),
        }
    }
    if models.is_empty() {
        return Err(AdminError::NotFound(name).into());
    }
    Ok(answer(models, wait))
}

/// `outcomes`, each with `"node": node`.
fn tagged(outcomes: Vec<Value>, node: &str) -> impl Iterator<Item = Value> + '_ {
    outcomes.into_iter().map(move |mut outcome| {
        if let Some(fields) = outcome.as_object_mut() {
            fields.insert("node".to_string(), json!(node));
        }
        outcome
    })
}
