//! Use cases that join the two stores: member writes (and their recovery).
//! Everything here runs on the store runtime (see [`StoreRuntime`]).

pub mod commit;
pub mod create;
pub mod delete;
pub mod lease;
pub mod members;
pub mod migrate;
mod plan;
pub mod queue;
pub mod read;
pub mod recovery;
pub mod staging;
pub mod write;

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::fhir::outcome::{IssueType, Outcome};
use crate::store::events::{EventStore, EventStoreError};
pub use crate::store::group_documents::LeaseHolder;
use crate::store::group_documents::{DocumentStoreError, GroupDocuments, GroupHead, MemberState};
use crate::store::insert_batcher::BatchSettings;

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The client gets exactly this outcome.
    #[error("{0:?}")]
    Outcome(Outcome),
    /// The Group still holds its members inline: the legacy path serves it.
    #[error("Group members are still stored inline (not migrated)")]
    NotMigrated,
    /// The store failed while the commit point was being written: the write
    /// may or may not have happened. Recovery settles it; a retry with the
    /// same `X-Request-Id` learns which.
    #[error("the outcome of the write to Group/{id} is unknown: {reason}")]
    CommitUnknown { id: String, reason: String },
    #[error(transparent)]
    Events(#[from] EventStoreError),
    /// The id names Groups of more than one owner (tenant), one of which
    /// keeps its roster here. The reference server refuses such a plain id
    /// (400, "Multiple resources found"); so does the proxy, never guessing
    /// which owner was meant. Groups none of which is managed go upstream.
    #[error("Group/{id} exists under more than one owner")]
    Shared { id: String },
    /// A Group whose roster the proxy keeps, addressed as `id|owner` or by
    /// its `_uuid`: refused with the address to use, never forwarded (the
    /// legacy server would answer without the roster).
    #[error("Group/{address} must be addressed as Group/{id}")]
    Readdress { address: String, id: String },
    /// Another address of a Group whose roster is kept here, when its id
    /// is also another owner's: the proxy keeps its per-Group state by id,
    /// so it cannot serve either under any address; refused, never guessed.
    #[error("Group/{address} is kept here, and its id {id} is shared by owners")]
    SharedKept { address: String, id: String },
    #[error(transparent)]
    Documents(DocumentStoreError),
}

impl From<DocumentStoreError> for GroupError {
    fn from(error: DocumentStoreError) -> Self {
        match error {
            DocumentStoreError::Ambiguous { id } => GroupError::Shared { id },
            error => GroupError::Documents(error),
        }
    }
}

impl GroupError {
    /// The OperationOutcome for the client; store failures become 503s that
    /// name the store, since nothing was changed in that case.
    pub fn to_outcome(&self) -> Outcome {
        match self {
            GroupError::Outcome(outcome) => outcome.clone(),
            GroupError::NotMigrated => Outcome::error(
                500,
                IssueType::Exception,
                "internal routing error: an unmigrated Group reached the member store",
            ),
            GroupError::CommitUnknown { id, reason } => Outcome::error(
                503,
                IssueType::Transient,
                format!(
                    "the Group metadata store failed while committing the write to Group/{id} \
                     ({reason}); the write may or may not have been applied: retry it with the \
                     same X-Request-Id to learn its outcome"
                ),
            ),
            GroupError::Events(e) if e.is_transient() => Outcome::error(
                503,
                IssueType::Transient,
                format!("member store unavailable, nothing was changed: {e}"),
            ),
            GroupError::Events(e) => Outcome::error(
                500,
                IssueType::Exception,
                format!(
                    "the member store refused the request, nothing was changed; the same \
                     request would be refused again, so do not retry it as it is: {e}"
                ),
            ),
            GroupError::Shared { id }
            | GroupError::Documents(DocumentStoreError::Ambiguous { id }) => Outcome::error(
                400,
                IssueType::Invalid,
                format!(
                    "Multiple resources found with id {id}. Please either specify the \
                         owner/sourceAssigningAuthority tag ({id}|<owner>) OR use uuid to query."
                ),
            ),
            GroupError::Readdress { address, id } => Outcome::error(
                400,
                IssueType::Invalid,
                format!(
                    "Group/{address} keeps its members in this server's member store, which \
                     answers for it only as Group/{id}; send the request to Group/{id}"
                ),
            ),
            GroupError::SharedKept { address, id } => Outcome::error(
                400,
                IssueType::NotSupported,
                format!(
                    "Group/{address} keeps its members in this server's member store, and its \
                     id {id} is also the id of another owner's Group; this server keeps member \
                     state by id, so it cannot tell the two apart and answers for neither (no \
                     address works until one of them is deleted or given another id); nothing \
                     was changed"
                ),
            ),
            GroupError::Documents(e) => Outcome::error(
                503,
                IssueType::Transient,
                format!("Group metadata store unavailable, nothing was changed: {e}"),
            ),
        }
    }
}

/// A managed Group whose document gained an inline `member` array behind the
/// proxy's back (a direct writer, an old script): two rosters for one Group.
/// Nothing is overwritten or merged silently; the operator folds them. The
/// answer is counted and logged.
pub fn drift(id: &str) -> Outcome {
    crate::operations::metrics::metrics().drift_detected();
    tracing::error!(
        group = id,
        "a managed Group's document holds inline members written around the proxy"
    );
    Outcome::error(
        409,
        IssueType::Conflict,
        format!(
            "Group/{id} keeps its members in the member store, but its document in MongoDB \
             also holds an inline member array written around this proxy; nothing was changed. \
             An operator must reconcile it: `fhir-group-proxy migrate --check --id {id}` lists \
             it and `--fold` moves the inline members into the member store"
        ),
    )
}

/// FOR TESTS ONLY: `FGP_WRITE_FAULT=exit-after-commit` makes the process exit
/// right after a member write's commit point, before its history entry and
/// publication, as if killed there (never set it otherwise). It exercises
/// recovery on the real code path against the real stores.
pub(crate) fn crash_point_after_commit() {
    static EXIT_AFTER_COMMIT: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
        std::env::var("FGP_WRITE_FAULT").is_ok_and(|fault| fault == "exit-after-commit")
    });
    if *EXIT_AFTER_COMMIT {
        eprintln!("FGP_WRITE_FAULT: exiting after a commit point, as if killed");
        std::process::exit(70);
    }
}

/// The answer when a Group's write lock stays taken for `write_wait`.
pub(crate) fn busy(id: &str) -> GroupError {
    GroupError::Outcome(Outcome::error(
        503,
        IssueType::Transient,
        format!("Group/{id} is busy with other member writes; retry later"),
    ))
}

/// Where a Group keeps its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RosterHome {
    /// No such Group (a `PUT` creates it).
    NoGroup,
    /// Members live in the legacy document (not migrated): the legacy path.
    Inline,
    /// Not migrated, but no members either: the first member write migrates it.
    Empty,
    /// Migrated: members are events in ClickHouse.
    Events,
}

#[derive(Debug, Clone)]
pub struct WriteSettings {
    /// A write holding a Group longer than this is presumed dead.
    pub lease_ttl: Duration,
    /// How long a write waits for a busy Group before answering 503.
    pub write_wait: Duration,
    /// 412 (FHIR R4) or 409 (HAPI's choice) for a stale If-Match.
    pub version_conflict_status: u16,
    /// See `fhir.patch_failure_status`.
    pub patch_failure_status: u16,
    /// See `fhir.remove_member_by_reference`.
    pub remove_by_reference: bool,
    /// See `fhir.reference_fields`.
    pub reference_fields: bool,
}

#[derive(Clone)]
pub struct GroupService {
    events: Arc<EventStore>,
    documents: GroupDocuments,
    settings: WriteSettings,
    /// This process's writers of one Group wait in line for the lock.
    queues: Arc<queue::GroupQueues<commit::QueuedWrite>>,
    /// A Group the legacy server created that this MongoDB does not hold:
    /// the upstream keeps its Groups elsewhere (readiness reports it).
    upstream_elsewhere: Arc<std::sync::Mutex<Option<String>>>,
    /// No Group holds a `pending` record of an earlier release any more
    /// (see [`Self::recover_stalled_writes`]).
    no_earlier_pending: Arc<std::sync::atomic::AtomicBool>,
    /// `_uuid` addresses seen, and the id each names when it is not the id
    /// itself (see [`Self::alias_of`]).
    uuid_aliases: Arc<std::sync::Mutex<std::collections::HashMap<String, Option<String>>>>,
}

impl GroupService {
    /// The authority members of this Group are stored under, when they are
    /// stored as the reference server stores them (`fhir.reference_fields`).
    pub(crate) fn legacy_authority<'h>(&self, head: &'h GroupHead) -> Option<&'h str> {
        self.settings
            .reference_fields
            .then_some(head.authority.as_deref())
            .flatten()
    }

    /// Connects both stores (lazily: nothing is contacted yet). Must run on the
    /// runtime that will serve the use cases (the batch writers live there).
    pub async fn connect(config: &Config, holder: LeaseHolder) -> Result<Self, GroupError> {
        let batch = BatchSettings {
            max_rows: config.members.batch_max_rows,
            max_delay: Duration::from_millis(config.members.batch_max_delay_ms),
        };
        let events = Arc::new(EventStore::start(&config.clickhouse, batch));
        let database = crate::store::mongo::connect(&config.mongo)
            .await
            .map_err(DocumentStoreError::from)?;
        let history = crate::store::mongo::connect_history(&config.mongo, &database)
            .await
            .map_err(DocumentStoreError::from)?;
        Ok(Self {
            events,
            documents: GroupDocuments::new(&database, &history, holder),
            settings: WriteSettings {
                lease_ttl: Duration::from_millis(config.members.lease_ttl_ms),
                write_wait: Duration::from_millis(config.members.write_wait_ms),
                version_conflict_status: config.members.version_conflict_status,
                patch_failure_status: config.fhir.patch_failure_status,
                remove_by_reference: config.fhir.remove_member_by_reference,
                reference_fields: config.fhir.reference_fields,
            },
            queues: Arc::default(),
            upstream_elsewhere: Arc::default(),
            no_earlier_pending: Arc::default(),
            uuid_aliases: Arc::default(),
        })
    }

    /// Where Group `id` keeps its members, for whole-resource writes.
    pub async fn roster_home(&self, id: &str) -> Result<RosterHome, GroupError> {
        let state = self.documents.member_state(id).await?;
        self.roster_home_in(id, state).await
    }

    /// [`Self::roster_home`] for deciding whether a member write is the
    /// proxy's: a Group whose roster is kept here is known from the proxy's
    /// own state alone. The write reads the Group's head under its lock
    /// anyway and hands the request to the legacy server when the document
    /// is gone (`NotMigrated`), or refuses it when its id is shared.
    /// With the state read for it, which the write reuses (see
    /// [`write::MemberPatchRequest::seen_state`]).
    pub async fn member_write_home(
        &self,
        id: &str,
    ) -> Result<(RosterHome, Option<MemberState>), GroupError> {
        let state = self.documents.member_state(id).await?;
        if state.in_clickhouse {
            return Ok((RosterHome::Events, Some(state)));
        }
        Ok((self.roster_home_in(id, state).await?, None))
    }

    async fn roster_home_in(&self, id: &str, state: MemberState) -> Result<RosterHome, GroupError> {
        match self
            .documents
            .head_of_generation(id, state.generation)
            .await
        {
            Ok(Some(_)) => {}
            Ok(None) => {
                self.refuse_other_addresses(id).await?;
                return Ok(RosterHome::NoGroup);
            }
            // Shared by owners: the legacy server answers for them (it
            // refuses the plain id), unless one keeps its roster here.
            Err(DocumentStoreError::Ambiguous { id }) => {
                return match state.in_clickhouse {
                    true => Err(GroupError::Shared { id }),
                    false => Ok(RosterHome::Inline),
                };
            }
            Err(e) => return Err(e.into()),
        }
        if state.in_clickhouse {
            return Ok(RosterHome::Events);
        }
        if self.documents.has_inline_members(id).await? {
            return Ok(RosterHome::Inline);
        }
        Ok(RosterHome::Empty)
    }

    /// The plain id of the Group `address` (`id|owner`, or a `_uuid` that is
    /// not the Group's id) names, when it is the only Group with that id;
    /// `None` when it names none or itself, or the id is shared by owners
    /// (then the proxy cannot tell its Groups apart).
    pub async fn plain_group_id(&self, address: &str) -> Result<Option<String>, GroupError> {
        let Some(id) = self.alias_of(address).await? else {
            return Ok(None);
        };
        match self.documents.head(&id).await {
            Ok(Some(_)) => Ok(Some(id)),
            Ok(None) | Err(DocumentStoreError::Ambiguous { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The id of the Group `address` names when that is not `address`
    /// itself: for `id|owner`, looked up each time (the Group may come and
    /// go); for a `_uuid`, once per process and address, since a document's
    /// `_uuid` never changes. Most Groups the reference server creates have
    /// their `_uuid` as id, and they need no lookup after the first.
    async fn alias_of(&self, address: &str) -> Result<Option<String>, GroupError> {
        const KEPT: usize = 65_536;
        if !icanbwell_conventions::is_uuid(address) || address.contains('|') {
            return Ok(self.documents.id_for_address(address).await?);
        }
        if let Some(known) = self
            .uuid_aliases
            .lock()
            .ok()
            .and_then(|a| a.get(address).cloned())
        {
            return Ok(known);
        }
        let alias = self
            .documents
            .id_for_address(address)
            .await?
            .filter(|id| id != address);
        if let Ok(mut aliases) = self.uuid_aliases.lock() {
            if aliases.len() >= KEPT {
                aliases.clear();
            }
            aliases.insert(address.to_string(), alias.clone());
        }
        Ok(alias)
    }

    /// `address` is not the id of a Group: if it is another address of a
    /// Group whose roster is kept here (`id|owner`, or its `_uuid`), the
    /// request is refused with the address to use.
    pub(crate) async fn refuse_other_addresses(&self, address: &str) -> Result<(), GroupError> {
        let Some(id) = self.documents.id_for_address(address).await? else {
            return Ok(());
        };
        if id == address || !self.documents.member_state(&id).await?.in_clickhouse {
            return Ok(());
        }
        match self.documents.head(&id).await {
            Err(DocumentStoreError::Ambiguous { .. }) => Err(GroupError::SharedKept {
                address: address.to_string(),
                id,
            }),
            Err(e) => Err(e.into()),
            Ok(_) => Err(GroupError::Readdress {
                address: address.to_string(),
                id,
            }),
        }
    }

    fn note_upstream_groups_elsewhere(&self, id: &str) {
        tracing::warn!(
            group = id,
            "the legacy server created a Group that the configured MongoDB does not hold: its \
             Groups live elsewhere, so the proxy forwards their requests unchanged"
        );
        if let Ok(mut last) = self.upstream_elsewhere.lock() {
            *last = Some(id.to_string());
        }
    }

    /// Whether ClickHouse answers (readiness).
    pub async fn ping_member_events(&self) -> Result<(), EventStoreError> {
        self.events.ping().await
    }

    /// Whether MongoDB answers (readiness).
    pub async fn ping_group_documents(&self) -> Result<(), DocumentStoreError> {
        self.documents.ping().await
    }

    /// The last Group the legacy server created that the configured MongoDB
    /// does not hold, if any.
    pub fn upstream_groups_elsewhere(&self) -> Option<String> {
        self.upstream_elsewhere
            .lock()
            .ok()
            .and_then(|last| last.clone())
    }

    /// At the start of a serving process: breaks the locks its own previous
    /// run left when it died, so their Groups need not wait out the lease.
    pub async fn break_own_dead_leases(&self) {
        match self.documents.locks().expire_own_dead().await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                locks = n,
                "expired the member write locks left by this proxy's previous run: the next writer of each Group finishes what they recorded"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "could not look for locks left by this proxy's previous run")
            }
        }
    }

    /// Whether any Group keeps its members in ClickHouse: until one does,
    /// nothing the legacy server does can split a roster.
    pub async fn manages_any_group(&self) -> Result<bool, GroupError> {
        Ok(self.documents.any_migrated().await?)
    }

    /// Which of `ids` keep their members in ClickHouse.
    pub async fn managed_among(&self, ids: &[String]) -> Result<Vec<String>, GroupError> {
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut managed: Vec<String> = self
            .documents
            .migrated_among(&ids)
            .await?
            .into_iter()
            .collect();
        managed.sort();
        Ok(managed)
    }

    async fn head_or_404(&self, id: &str) -> Result<GroupHead, GroupError> {
        self.documents.head(id).await?.ok_or_else(|| {
            GroupError::Outcome(Outcome::error(
                404,
                IssueType::NotFound,
                format!("Group/{id} is not known"),
            ))
        })
    }
}

/// A tokio runtime of its own for store I/O: the MongoDB driver and the
/// group-commit writers keep background tasks on the runtime that created them,
/// and pingora's per-service runtimes are not that runtime.
pub struct StoreRuntime {
    /// Always `Some` until dropped.
    runtime: Option<tokio::runtime::Runtime>,
}

impl StoreRuntime {
    pub fn new(worker_threads: usize) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads.max(1))
            .thread_name("fgp-store")
            .enable_all()
            .build()?;
        Ok(Self {
            runtime: Some(runtime),
        })
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime
            .as_ref()
            .expect("the store runtime lives until StoreRuntime is dropped")
    }

    pub fn handle(&self) -> tokio::runtime::Handle {
        self.runtime().handle().clone()
    }

    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime().block_on(future)
    }
}

impl Drop for StoreRuntime {
    /// The last owner may be dropped on one of pingora's runtime threads at
    /// exit, where a blocking runtime drop panics; by then graceful shutdown
    /// has drained the store work, so nothing is waited for.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
