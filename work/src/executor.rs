//! Works that name an `executor` write as that ServiceAccount: their applies, prunes and
//! deletions go through a client impersonating it, so the API server's own authorization (RBAC,
//! escalation checks) decides what such a work may do.
//!
//! The agent's records stay written with its own rights (they are its bookkeeping), and name the
//! executor's user, so a work deleted after a restart, known only from its record, is deleted
//! as its executor too ([`ExecutorClients::for_record`]). A client per
//! executor is made once by the agent's [`ClientFactory`] and reused. Without a factory (an
//! engine embedded without one), or for a subject that is not a valid ServiceAccount, the work
//! fails as a whole: it is never applied with the agent's own rights instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::Client;

use super::manifestwork::{AppliedManifestWork, ManifestWork};
use super::validate::{check_label, check_subdomain};
use spokelet_base::lock::lock;

/// Makes a client acting as `user` in `groups` (Kubernetes impersonation). The agent builds it
/// from its own cluster configuration.
#[derive(Clone)]
pub struct ClientFactory(pub Arc<MakeClient>);

/// Why the factory could not make a client (the agent's own client-building error; the engine
/// only reports it).
pub type MakeClientError = Box<dyn std::error::Error + Send + Sync>;

/// The factory's function: user, groups → a client, or why not.
pub type MakeClient = dyn Fn(&str, &[String]) -> Result<Client, MakeClientError> + Send + Sync;

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
    #[error("cannot act as executor {user}: {source}")]
    Client {
        user: String,
        /// Shared, so the error stays `Clone` (one failure is reported for every manifest).
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
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
    service_account_identity(&sa.namespace, &sa.name).map(Some)
}

/// The identity of an executor user as recorded (`system:serviceaccount:<namespace>:<name>`).
pub fn identity_of_user(user: &str) -> Result<Identity, ExecutorError> {
    let invalid = || ExecutorError::InvalidServiceAccount {
        namespace: String::new(),
        name: user.to_string(),
    };
    let rest = user.strip_prefix("system:serviceaccount:").ok_or_else(invalid)?;
    let (namespace, name) = rest.split_once(':').ok_or_else(invalid)?;
    service_account_identity(namespace, name)
}

/// The impersonation identity of ServiceAccount `namespace/name`, once both are valid names.
fn service_account_identity(namespace: &str, name: &str) -> Result<Identity, ExecutorError> {
    let valid = check_label("executor namespace", namespace).is_ok()
        && check_subdomain("executor name", name, 253).is_ok();
    if !valid {
        return Err(ExecutorError::InvalidServiceAccount {
            namespace: namespace.to_string(),
            name: name.to_string(),
        });
    }
    Ok(Identity {
        user: format!("system:serviceaccount:{namespace}:{name}"),
        groups: vec![
            "system:serviceaccounts".to_string(),
            format!("system:serviceaccounts:{namespace}"),
            "system:authenticated".to_string(),
        ],
    })
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
        match identity(work)? {
            Some(id) => self.acting_as(id),
            None => Ok(own.clone()),
        }
    }

    /// The client a work known only from its record (after a restart) is deleted with: the
    /// executor the record names, else `own`. A record naming an executor that cannot be acted
    /// as is an error, never a fallback to `own`.
    pub fn for_record(&self, amw: &AppliedManifestWork, own: &Client) -> Result<Client, ExecutorError> {
        match super::applied_work::recorded_executor(amw) {
            Some(user) => self.acting_as(identity_of_user(user)?),
            None => Ok(own.clone()),
        }
    }

    /// The client impersonating `id`, made once.
    fn acting_as(&self, id: Identity) -> Result<Client, ExecutorError> {
        if let Some(c) = lock(&self.clients).get(&id.user) {
            return Ok(c.clone());
        }
        let factory = self.factory.as_ref().ok_or(ExecutorError::NoFactory)?;
        let client = (factory.0)(&id.user, &id.groups).map_err(|e| ExecutorError::Client {
            user: id.user.clone(),
            source: Arc::from(e),
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
    fn a_recorded_executor_user_reads_back_as_the_same_identity() {
        let id = identity(&work_with(Some(sa("team-a", "deployer"))))
            .unwrap()
            .unwrap();
        assert_eq!(identity_of_user(&id.user).unwrap(), id);
        for bad in [
            "",
            "system:serviceaccount:team-a",
            "system:serviceaccount::x",
            "system:serviceaccount:Team:x",
            "alice",
            "system:serviceaccount:a:b:c",
        ] {
            assert!(identity_of_user(bad).is_err(), "{bad:?}");
        }
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
