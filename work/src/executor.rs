//! Works that name an `executor` write as that ServiceAccount: their applies, prunes and
//! deletions go through a client impersonating it, so the API server's own authorization (RBAC,
//! escalation checks) decides what such a work may do.
//!
//! The agent's records stay written with its own rights (they are its bookkeeping). A client per
//! executor is made once by the agent's [`ClientFactory`] and reused. Without a factory (an
//! engine embedded without one), or for a subject that is not a valid ServiceAccount, the work
//! fails as a whole: it is never applied with the agent's own rights instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::Client;

use super::manifestwork::ManifestWork;
use super::validate::{check_label, check_subdomain};
use spokelet_base::lock::lock;

/// Makes a client acting as `user` in `groups` (Kubernetes impersonation). The agent builds it
/// from its own cluster configuration.
#[derive(Clone)]
pub struct ClientFactory(pub Arc<MakeClient>);

/// The factory's function: user, groups → a client, or why not.
pub type MakeClient = dyn Fn(&str, &[String]) -> Result<Client, String> + Send + Sync;

impl std::fmt::Debug for ClientFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientFactory")
    }
}

/// Why a work's executor cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExecutorError {
    /// Only `ServiceAccount` subjects are defined by the API.
    #[error("executor subject type {0:?} is not supported (only ServiceAccount)")]
    UnsupportedType(String),
    /// The ServiceAccount's namespace or name is missing or not a valid name.
    #[error("executor ServiceAccount {namespace:?}/{name:?} is not a valid ServiceAccount name")]
    InvalidServiceAccount { namespace: String, name: String },
    /// The agent was built without a way to impersonate.
    #[error("this agent cannot impersonate executors; the work is not applied with the agent's own rights")]
    NoFactory,
    /// The impersonating client could not be made.
    #[error("cannot act as executor {user}: {reason}")]
    Client { user: String, reason: String },
}

/// The identity a work's executor names, as impersonation headers carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `system:serviceaccount:<namespace>:<name>`.
    pub user: String,
    /// The groups Kubernetes puts every ServiceAccount in.
    pub groups: Vec<String>,
}

/// The executor identity of `work`, None when it names none (the agent's own rights apply).
pub fn identity(work: &ManifestWork) -> Result<Option<Identity>, ExecutorError> {
    let Some(exec) = work.spec.executor.as_ref() else {
        return Ok(None);
    };
    let subject = &exec.subject;
    if subject.type_ != "ServiceAccount" {
        return Err(ExecutorError::UnsupportedType(subject.type_.clone()));
    }
    let sa = subject.service_account.clone().unwrap_or_default();
    let valid = check_label("executor namespace", &sa.namespace).is_ok()
        && check_subdomain("executor name", &sa.name, 253).is_ok();
    if !valid {
        return Err(ExecutorError::InvalidServiceAccount {
            namespace: sa.namespace,
            name: sa.name,
        });
    }
    Ok(Some(Identity {
        user: format!("system:serviceaccount:{}:{}", sa.namespace, sa.name),
        groups: vec![
            "system:serviceaccounts".to_string(),
            format!("system:serviceaccounts:{}", sa.namespace),
            "system:authenticated".to_string(),
        ],
    }))
}

/// Impersonating clients, one per executor identity, made on first use.
#[derive(Default)]
pub struct ExecutorClients {
    factory: Option<ClientFactory>,
    /// user → client. Taken through the crate's `lock`, never across an await.
    clients: Mutex<HashMap<String, Client>>,
}

impl std::fmt::Debug for ExecutorClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutorClients")
            .field("factory", &self.factory.is_some())
            .finish_non_exhaustive()
    }
}

impl ExecutorClients {
    pub fn new(factory: Option<ClientFactory>) -> Self {
        ExecutorClients {
            factory,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The client a work writes with: `own` without an executor, else the executor's.
    pub fn for_work(&self, work: &ManifestWork, own: &Client) -> Result<Client, ExecutorError> {
        let Some(id) = identity(work)? else {
            return Ok(own.clone());
        };
        if let Some(c) = lock(&self.clients).get(&id.user) {
            return Ok(c.clone());
        }
        let factory = self.factory.as_ref().ok_or(ExecutorError::NoFactory)?;
        let client = (factory.0)(&id.user, &id.groups).map_err(|reason| ExecutorError::Client {
            user: id.user.clone(),
            reason,
        })?;
        lock(&self.clients).insert(id.user, client.clone());
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifestwork::{
        ManifestWorkExecutor, ManifestWorkExecutorSubject, ManifestWorkSpec,
        ManifestWorkSubjectServiceAccount,
    };

    fn work_with(subject: Option<ManifestWorkExecutorSubject>) -> ManifestWork {
        let spec = ManifestWorkSpec {
            executor: subject.map(|subject| ManifestWorkExecutor { subject }),
            ..Default::default()
        };
        ManifestWork::new("w", spec)
    }

    fn sa(ns: &str, name: &str) -> ManifestWorkExecutorSubject {
        ManifestWorkExecutorSubject {
            type_: "ServiceAccount".into(),
            service_account: Some(ManifestWorkSubjectServiceAccount {
                namespace: ns.into(),
                name: name.into(),
            }),
        }
    }

    #[test]
    fn a_service_account_executor_is_impersonated_with_its_groups() {
        let id = identity(&work_with(Some(sa("team-a", "deployer"))))
            .unwrap()
            .unwrap();
        assert_eq!(id.user, "system:serviceaccount:team-a:deployer");
        assert!(id.groups.contains(&"system:serviceaccounts:team-a".to_string()));
        assert_eq!(identity(&work_with(None)).unwrap(), None);
    }

    #[test]
    fn unusable_executors_fail_the_work_instead_of_falling_back_to_the_agents_rights() {
        let mut user = sa("team-a", "x");
        user.type_ = "User".into();
        assert!(matches!(
            identity(&work_with(Some(user))),
            Err(ExecutorError::UnsupportedType(_))
        ));
        for (ns, name) in [("", "x"), ("team-a", ""), ("Team", "x"), ("a", "b/c")] {
            assert!(identity(&work_with(Some(sa(ns, name)))).is_err(), "{ns}/{name}");
        }
        let clients = ExecutorClients::new(None);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // A client that is never used to connect.
            let cfg = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
            let own = Client::try_from(cfg).unwrap();
            assert!(clients.for_work(&work_with(None), &own).is_ok());
            let err = match clients.for_work(&work_with(Some(sa("team-a", "x"))), &own) {
                Ok(_) => panic!("a work with an executor got a client without a factory"),
                Err(e) => e,
            };
            assert!(matches!(err, ExecutorError::NoFactory), "{err}");
        });
    }
}
