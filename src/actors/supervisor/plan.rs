//! Planning an admin command: which models it loads, reloads, evicts or unloads to make room
//! within the devices' memory budgets, checked and claimed before anything runs.

use super::{ModelStatus, SupervisorState};
use crate::actors::admin::{AdminCommand, AdminError, Failure, ModelOutcome};
use crate::config::ModelSpec;
use std::time::Duration;

pub(super) fn plan(
    state: &mut SupervisorState,
    command: AdminCommand,
    statuses: &[ModelStatus],
) -> Result<Plan, AdminError> {
    let plan = match command {
        AdminCommand::Load(spec) => {
            if state.models.contains_key(&spec.name) {
                return Err(AdminError::AlreadyLoaded(spec.name));
            }
            let unload = make_room(state, statuses, &spec, false, &[]).map_err(|reason| {
                AdminError::LoadFailed {
                    name: spec.name.clone(),
                    reason: Failure::other(reason),
                }
            })?;
            Plan::Load { spec, unload }
        }
        AdminCommand::Evict { name, abort, drain } => {
            if !state.models.contains_key(&name) {
                return Err(AdminError::NotFound(name));
            }
            Plan::Evict { name, abort, drain }
        }
        AdminCommand::Reload { name, spec } => {
            let current = state
                .models
                .get(&name)
                .cloned()
                .ok_or(AdminError::NotFound(name))?;
            let spec = spec.unwrap_or(current);
            reload_plan(state, statuses, spec)?
        }
        AdminCommand::ReloadPool => {
            let path = state.config_path.as_ref().ok_or(AdminError::NoPoolFile)?;
            let config = crate::config::load(path).map_err(AdminError::Config)?;
            let mut removed: Vec<String> = state
                .models
                .keys()
                .filter(|name| !config.models.iter().any(|spec| &spec.name == *name))
                .cloned()
                .collect();
            removed.sort();
            let mut pool = PoolPlan {
                removed,
                ..PoolPlan::default()
            };
            let gone = pool.removed.clone();
            let mut victims: Vec<String> = Vec::new();
            for spec in &config.models {
                match state.models.get(&spec.name) {
                    None => match make_room(state, statuses, spec, false, &gone) {
                        Ok(unload) => {
                            victims.extend(unload);
                            pool.added.push(spec.clone());
                        }
                        Err(reason) => pool.rejected.push((spec.name.clone(), reason)),
                    },
                    Some(current) if current != spec => {
                        let both = make_room(state, statuses, spec, true, &gone);
                        let one = make_room(state, statuses, spec, false, &gone);
                        match (both, one) {
                            (Ok(unload), _) => {
                                victims.extend(unload);
                                pool.changed.push((spec.clone(), false));
                            }
                            (Err(_), Ok(unload)) => {
                                victims.extend(unload);
                                pool.changed.push((spec.clone(), true));
                            }
                            (Err(_), Err(reason)) => {
                                pool.rejected.push((spec.name.clone(), reason))
                            }
                        }
                    }
                    Some(_) => pool.unchanged.push(spec.name.clone()),
                }
            }
            victims.sort();
            victims.dedup();
            victims.retain(|name| {
                !pool.added.iter().any(|s| &s.name == name)
                    && !pool.changed.iter().any(|(s, _)| &s.name == name)
            });
            pool.unload = victims;
            Plan::Pool(pool)
        }
    };
    claim(state, plan)
}

/// Claims every model a plan touches, or refuses with 409 if one is already being worked on.
pub(super) fn claim(state: &mut SupervisorState, plan: Plan) -> Result<Plan, AdminError> {
    let touched = plan.touched();
    if let Some(name) = touched.iter().find(|name| state.busy.contains(*name)) {
        return Err(AdminError::InProgress(name.clone()));
    }
    state.busy.extend(touched);
    if let Plan::Load { spec, .. } = &plan {
        state.models.insert(spec.name.clone(), spec.clone());
    }
    if let Plan::Pool(pool) = &plan {
        for (name, _) in &pool.rejected {
            tracing::warn!(model = %name, "pool reload: the model does not fit its memory budget");
        }
        for spec in &pool.added {
            state.models.insert(spec.name.clone(), spec.clone());
        }
    }
    Ok(plan)
}

/// Make-before-break when the budgets hold both generations, else break-before-make.
fn reload_plan(
    state: &SupervisorState,
    statuses: &[ModelStatus],
    spec: ModelSpec,
) -> Result<Plan, AdminError> {
    if let Ok(unload) = make_room(state, statuses, &spec, true, &[]) {
        return Ok(Plan::Reload {
            spec,
            unload,
            break_first: false,
        });
    }
    let unload =
        make_room(state, statuses, &spec, false, &[]).map_err(|reason| AdminError::LoadFailed {
            name: spec.name.clone(),
            reason: Failure::other(reason),
        })?;
    Ok(Plan::Reload {
        spec,
        unload,
        break_first: true,
    })
}

/// Chooses idle, unpinned models to unload so that `spec` fits every device's budget, least
/// recently used first. `both` keeps the model's own current copy (a make-before-break
/// reload); otherwise its current copy is not counted.
pub(super) fn make_room(
    state: &SupervisorState,
    statuses: &[ModelStatus],
    spec: &ModelSpec,
    both: bool,
    gone: &[String],
) -> Result<Vec<String>, String> {
    let mut victims: Vec<String> = Vec::new();
    let mut devices = spec.devices.clone();
    devices.sort_by_key(|d| d.to_string());
    devices.dedup();
    for device in devices {
        let Some(&budget) = state.budgets.get(&device) else {
            continue;
        };
        let copies = spec.devices.iter().filter(|d| **d == device).count() as u64;
        let need = copies * spec.footprint(device);
        let held_on = |name: &str| -> u64 {
            state
                .held
                .get(name)
                .map(|list| {
                    list.iter()
                        .filter(|(d, _)| *d == device)
                        .map(|(_, b)| b)
                        .sum()
                })
                .unwrap_or(0)
        };
        let mut used: u64 = state
            .held
            .keys()
            .filter(|name| both || **name != spec.name)
            .filter(|name| !victims.contains(name) && !gone.contains(name))
            .map(|name| held_on(name))
            .sum();
        if used + need <= budget {
            continue;
        }
        let mut candidates: Vec<(&ModelStatus, u64)> = statuses
            .iter()
            .filter(|status| status.name != spec.name && !victims.contains(&status.name))
            .filter(|status| !gone.contains(&status.name))
            .filter(|status| !state.busy.contains(&status.name))
            .filter(|status| !state.models.get(&status.name).is_some_and(|m| m.pinned))
            .filter(|status| status.idle_for.is_some())
            .map(|status| (status, held_on(&status.name)))
            .filter(|(_, bytes)| *bytes > 0)
            .collect();
        candidates.sort_by_key(|(status, _)| std::cmp::Reverse(status.idle_for));
        for (status, bytes) in candidates {
            if used + need <= budget {
                break;
            }
            victims.push(status.name.clone());
            used -= bytes;
        }
        if used + need > budget {
            return Err(format!(
                "{} needs {need} bytes on {device}, whose memory budget is {budget} bytes; \
                 {used} bytes are held by models that are busy or pinned",
                spec.name
            ));
        }
    }
    Ok(victims)
}

/// An admin command, checked and with its models claimed.
pub enum Plan {
    /// Load a new model, after unloading these to make room.
    Load {
        /// The model.
        spec: ModelSpec,
        /// Models to unload first.
        unload: Vec<String>,
    },
    /// Load a configured, unloaded model (a lazy model's first request).
    Activate {
        /// The model.
        spec: ModelSpec,
        /// Models to unload first.
        unload: Vec<String>,
    },
    /// Unload an idle model's replicas, keeping it configured.
    Unload(String),
    /// Evict a model.
    Evict {
        /// The model.
        name: String,
        /// End in-flight requests at once.
        abort: bool,
        /// How long to drain.
        drain: Duration,
    },
    /// Reload a model from this spec.
    Reload {
        /// The new spec.
        spec: ModelSpec,
        /// Models to unload first.
        unload: Vec<String>,
        /// Stop the old generation before loading the new one (budget too small for both).
        break_first: bool,
    },
    /// Apply a new pool file.
    Pool(PoolPlan),
}

/// The difference between the running pool and a new pool file.
#[derive(Default)]
pub struct PoolPlan {
    /// Models only in the file.
    pub added: Vec<ModelSpec>,
    /// Models whose spec changed, and whether their reload must break before making.
    pub changed: Vec<(ModelSpec, bool)>,
    /// Models no longer in the file.
    pub removed: Vec<String>,
    /// Models whose spec is the same.
    pub unchanged: Vec<String>,
    /// Idle models to unload first, to make room within the memory budgets.
    pub unload: Vec<String>,
    /// Models that cannot fit their devices' budgets, with the reason.
    pub rejected: Vec<(String, String)>,
}

impl Plan {
    /// What an accepted plan starts, one outcome per model: `loading`, `added` (a lazy model,
    /// routed without loading), `reloading`, `evicting`, `unloading`, `unchanged`, or `failed`
    /// for a model a pool file asks for that cannot fit its devices.
    pub fn started(&self) -> Vec<ModelOutcome> {
        let outcome = |name: &str, action| ModelOutcome {
            name: name.to_string(),
            action,
            error: None,
        };
        match self {
            Plan::Load { spec, .. } | Plan::Activate { spec, .. } => {
                vec![outcome(&spec.name, "loading")]
            }
            Plan::Reload { spec, .. } => vec![outcome(&spec.name, "reloading")],
            Plan::Evict { name, .. } => vec![outcome(name, "evicting")],
            Plan::Unload(name) => vec![outcome(name, "unloading")],
            Plan::Pool(pool) => {
                let added = pool.added.iter().map(|spec| {
                    outcome(&spec.name, if spec.preload { "loading" } else { "added" })
                });
                let changed = pool
                    .changed
                    .iter()
                    .map(|(spec, _)| outcome(&spec.name, "reloading"));
                let removed = pool.removed.iter().map(|name| outcome(name, "evicting"));
                let rejected = pool.rejected.iter().map(|(name, reason)| ModelOutcome {
                    error: Some(reason.clone()),
                    ..outcome(name, "failed")
                });
                let unchanged = pool.unchanged.iter().map(|name| outcome(name, "unchanged"));
                removed
                    .chain(added)
                    .chain(changed)
                    .chain(rejected)
                    .chain(unchanged)
                    .collect()
            }
        }
    }

    fn touched(&self) -> Vec<String> {
        match self {
            Plan::Load { spec, unload }
            | Plan::Activate { spec, unload }
            | Plan::Reload { spec, unload, .. } => std::iter::once(spec.name.clone())
                .chain(unload.iter().cloned())
                .collect(),
            Plan::Evict { name, .. } | Plan::Unload(name) => vec![name.clone()],
            Plan::Pool(pool) => pool
                .added
                .iter()
                .chain(pool.changed.iter().map(|(spec, _)| spec))
                .map(|spec| spec.name.clone())
                .chain(pool.removed.iter().cloned())
                .chain(pool.unload.iter().cloned())
                .collect(),
        }
    }
}
