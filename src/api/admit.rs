//! Admission of a request: on this node's router or, with `[cluster]`, on another node's
//! replica. The least-loaded ready replica of the whole cluster takes it, this node's when
//! loads tie; a peer's load is its last listing's in-flight and queued requests (up to a
//! second old) plus this node's own requests sent there since, so a burst spreads. When the
//! chosen side refuses (absent, overloaded, not ready, unreachable), the other is tried.

use std::time::Duration;

use ractor::rpc::CallResult;

use super::error::ApiError;
use super::AppState;
use crate::actors::cluster::Relay;
use crate::actors::engine::GenerationRequest;
use crate::actors::router::{Admitted, RouteError, RouterMsg};

/// How long the router may take to answer an admission call.
const ROUTER_TIMEOUT: Duration = Duration::from_secs(5);

/// Admits `request` for `model` where the cluster has room for it.
pub(super) async fn admit(
    state: &AppState,
    model: &str,
    request: GenerationRequest,
) -> Result<Admitted, ApiError> {
    let Some((relay, peers)) = peers(state, model) else {
        return Ok(on_router(state, model, request).await??);
    };
    let least = peers.first().map_or(usize::MAX, |(_, load)| *load);
    let here_first = local_load(state, model)
        .await
        .is_some_and(|load| load <= least);
    if here_first {
        match on_router(state, model, request.clone()).await? {
            Err(refused) if elsewhere(&refused) => Ok(on_peers(relay, &peers, model, request)
                .await
                .map_err(|_| refused)?),
            here => Ok(here?),
        }
    } else {
        match on_peers(relay, &peers, model, request.clone()).await {
            Ok(admitted) => Ok(admitted),
            Err(there) => match on_router(state, model, request).await? {
                Err(RouteError::UnknownModel(_)) => Err(there.into()),
                here => Ok(here?),
            },
        }
    }
}

/// With `[cluster]`, the relay and the peers with a ready replica of `model`, the least
/// loaded first; `None` when there is none.
fn peers<'a>(state: &'a AppState, model: &str) -> Option<(&'a Relay, Vec<(String, usize)>)> {
    let (relay, view) = (state.relay.as_ref()?, state.cluster.as_ref()?);
    let mut peers = view.serving(model);
    for (node, load) in &mut peers {
        *load += relay.open_on(node);
    }
    peers.sort_by_key(|(_, load)| *load);
    (!peers.is_empty()).then_some((relay, peers))
}

/// Whether a local refusal is worth a try on another node.
fn elsewhere(refused: &RouteError) -> bool {
    matches!(
        refused,
        RouteError::UnknownModel(_) | RouteError::Overloaded(_) | RouteError::NotReady { .. }
    )
}

/// This node's load of `model`; `None` without a ready replica here.
async fn local_load(state: &AppState, model: &str) -> Option<usize> {
    let call = state
        .router
        .call(
            |reply| RouterMsg::Load(model.to_string(), reply),
            Some(ROUTER_TIMEOUT),
        )
        .await;
    match call {
        Ok(CallResult::Success(load)) => load,
        _ => None,
    }
}

/// Admission by this node's router; the outer error when the router does not answer.
async fn on_router(
    state: &AppState,
    model: &str,
    request: GenerationRequest,
) -> Result<Result<Admitted, RouteError>, ApiError> {
    let call = state
        .router
        .call(
            |reply| RouterMsg::Dispatch {
                model: model.to_string(),
                request,
                reply,
            },
            Some(ROUTER_TIMEOUT),
        )
        .await;
    match call {
        Ok(CallResult::Success(result)) => Ok(result),
        Ok(_) | Err(_) => Err(ApiError::unavailable(
            "model_unavailable",
            "the router did not answer",
        )),
    }
}

/// Admission on the first of `peers` that takes it; the last refusal otherwise.
async fn on_peers(
    relay: &Relay,
    peers: &[(String, usize)],
    model: &str,
    request: GenerationRequest,
) -> Result<Admitted, RouteError> {
    let mut last = Err(RouteError::UnknownModel(model.to_string()));
    for (node, _) in peers {
        last = relay.dispatch(node, model, request.clone()).await;
        if last.is_ok() {
            break;
        }
    }
    last
}
