//! The pingora side: one `ProxyHttp` implementation whose phases route each
//! request, forward what is not ours byte for byte, and turn failures into
//! FHIR OperationOutcomes.

pub mod authorize;
pub mod canonical;
pub mod failure;
pub mod forwarding;
pub mod guard;
pub mod member_write;
pub mod read;
pub mod request_body;
pub mod request_facts;
pub mod respond;
pub mod roster_answer;
pub mod roster_write;
pub mod route;
pub mod search;
pub mod upstream_client;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::http::ResponseHeader;
use pingora::prelude::HttpPeer;
use pingora::proxy::{http_proxy_service, FailToProxy, ProxyHttp, Session};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::{Error, Result};
use thiserror::Error as ThisError;
use tracing::Instrument;

use crate::config::{Config, ConfigError, UpstreamTarget};
use crate::fhir::outcome::{IssueType, Outcome};
use crate::group::{GroupService, StoreRuntime};
use crate::operations::metrics::{metrics, Disposition, UpstreamClientKind};
use crate::operations::shutdown::{
    InFlightGuard, Lifecycle, ShutdownSettings, ShutdownSummary, StoreTasks,
};
use crate::operations::{admin, readiness, trace_context};
use forwarding::{rewrite_upstream_request, ClientFacts, X_REQUEST_ID};
use respond::Reply;
use route::Route;

#[derive(Debug, ThisError)]
pub enum ProxyError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot resolve upstream {authority}: {reason}")]
    Resolve { authority: String, reason: String },
    #[error("cannot start the store runtime: {0}")]
    Runtime(#[from] std::io::Error),
    #[error("cannot connect the member stores: {0}")]
    Stores(#[from] crate::group::GroupError),
    #[error("cannot set up authorization: {0}")]
    Auth(#[from] crate::auth::jwt::JwksError),
    #[error("cannot open the admin listener on {addr} (server.admin_listen): {source}")]
    AdminListen {
        addr: String,
        source: std::io::Error,
    },
}

/// Per-request state shared by the phases.
pub struct RequestContext {
    /// `X-Request-Id` from the client, or one generated here; sent upstream and back.
    pub request_id: String,
    /// We answered `Expect: 100-continue` ourselves; the upstream must not be asked again.
    pub continue_sent: bool,
    /// The proxy answered this request itself.
    pub intercepted: bool,
    /// [`Route::name`] of the request, for metrics and the access log.
    pub route: &'static str,
    /// Trace id of a valid W3C `traceparent` (forwarded unchanged).
    pub trace_id: Option<String>,
    /// A Group create forwarded to the legacy server, adopted on its 201.
    pub created: Option<roster_write::CreatedGroup>,
    /// Refused before routing (an `X-Request-Id` the proxy cannot keep).
    pub refusal: Option<Outcome>,
    /// Where the request's Group keeps its members, once looked up for a
    /// member write (see [`FhirGroupProxy::member_write_home`]).
    pub member_write_home: Option<crate::group::RosterHome>,
    /// The member state read with it, which the write's first attempt reuses.
    pub member_state_seen: Option<crate::store::group_documents::MemberState>,
    pub started: Instant,
    /// Carries the request id (and trace id) into every log line of the request.
    pub span: tracing::Span,
    /// Shutdown waits for this request while it lives.
    _in_flight: InFlightGuard,
}

pub struct FhirGroupProxy {
    pub(crate) config: Arc<Config>,
    target: UpstreamTarget,
    upstream_addr: SocketAddr,
    pub(crate) upstream_client: upstream_client::UpstreamClient,
    /// `None` when member handling is disabled: everything is forwarded.
    pub(crate) group_service: Option<GroupService>,
    /// Request work on the store runtime, tracked for graceful shutdown.
    pub(crate) store_runtime: StoreTasks,
    lifecycle: Arc<Lifecycle>,
    pub(crate) authorizer: Arc<crate::auth::Authorizer>,
    /// Owns the runtime behind `store_runtime`.
    store_runtime_owner: Arc<StoreRuntime>,
}

impl FhirGroupProxy {
    pub fn new(config: Arc<Config>, lifecycle: Arc<Lifecycle>) -> Result<Self, ProxyError> {
        let target = config.upstream_target()?;
        // Resolved once at start: a lookup per request would block a worker thread.
        let upstream_addr = (target.host.as_str(), target.port)
            .to_socket_addrs()
            .map_err(|e| ProxyError::Resolve {
                authority: target.authority.clone(),
                reason: e.to_string(),
            })?
            .next()
            .ok_or_else(|| ProxyError::Resolve {
                authority: target.authority.clone(),
                reason: "no address".into(),
            })?;
        let store_runtime = Arc::new(StoreRuntime::new(config.members.store_threads)?);
        let group_service = if config.members.enabled {
            let holder = crate::group::LeaseHolder::here("serve", &config.server.listen);
            let service = store_runtime.block_on(GroupService::connect(&config, holder))?;
            let restarted = service.clone();
            store_runtime
                .handle()
                .spawn(async move { restarted.break_own_dead_leases().await });
            let settings = config.clickhouse.clone();
            // The schema is applied in the background so the proxy serves
            // passthrough traffic even while ClickHouse is still starting.
            store_runtime.handle().spawn(async move {
                crate::store::setup::apply_schema_until_done(&settings).await
            });
            let sweeper = service.clone();
            store_runtime
                .handle()
                .spawn(sweeper.sweep_stalled_writes(std::time::Duration::from_secs(2)));
            store_runtime.handle().spawn(
                service
                    .clone()
                    .sweep_staging(config.members.staging_months_kept),
            );
            Some(service)
        } else {
            None
        };
        let authorizer =
            Arc::new(store_runtime.block_on(crate::auth::Authorizer::from_settings(&config.auth))?);
        Ok(Self {
            authorizer,
            upstream_client: upstream_client::UpstreamClient::new(&config.upstream, upstream_addr),
            config,
            target,
            upstream_addr,
            group_service,
            store_runtime: StoreTasks::new(store_runtime.handle()),
            lifecycle,
            store_runtime_owner: store_runtime,
        })
    }

    /// Runs store work on the store runtime, bounded by
    /// `members.store_timeout_ms`. The work is not cancelled on timeout: a
    /// write that reached its commit point completes, and a retry with the same
    /// `X-Request-Id` learns its outcome.
    pub(crate) async fn on_stores<T, F>(&self, future: F) -> std::result::Result<T, Outcome>
    where
        T: Send + 'static,
        F: std::future::Future<Output = T> + Send + 'static,
    {
        let limit = std::time::Duration::from_millis(self.config.members.store_timeout_ms);
        match tokio::time::timeout(limit, self.store_runtime.spawn(future)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(join_error)) => {
                tracing::error!(%join_error, "store task failed");
                Err(Outcome::error(
                    500,
                    IssueType::Exception,
                    "the member store task failed unexpectedly; read the Group to see its state",
                ))
            }
            Err(_) => Err(Outcome::error(
                504,
                IssueType::Timeout,
                format!(
                    "the member stores did not answer within {} ms; a write may still complete: \
                     retry it with the same X-Request-Id to learn its outcome",
                    limit.as_millis()
                ),
            )),
        }
    }

    /// Starts the admin listener (metrics, health, readiness) on the store runtime.
    fn start_admin_listener(&self, addr: &str) -> Result<(), ProxyError> {
        let listen_error = |source| ProxyError::AdminListen {
            addr: addr.to_string(),
            source,
        };
        let listener = admin::bind(addr).map_err(listen_error)?;
        let state = Arc::new(admin::AdminState {
            readiness: readiness::Readiness::new(
                self.upstream_addr,
                self.group_service.clone(),
                self.lifecycle.clone(),
            ),
            lifecycle: self.lifecycle.clone(),
        });
        admin::spawn(listener, state, &self.store_runtime_owner.handle()).map_err(listen_error)
    }

    /// Like nginx, answers `Expect: 100-continue` here, and the request is
    /// forwarded without it: pingora would otherwise wait for a body the
    /// client holds back.
    async fn answer_expect_continue(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
    ) -> Result<()> {
        if pingora::protocols::http::v1::common::is_expect_continue_req(session.req_header()) {
            session.write_continue_response().await?;
            ctx.continue_sent = true;
        }
        Ok(())
    }

    /// The work of `request_filter` for a request the proxy may answer
    /// itself, inside the request's span.
    async fn route_request(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
        route: Route,
    ) -> Result<Reply> {
        self.answer_expect_continue(session, ctx).await?;
        if let Some(outcome) = ctx.refusal.take() {
            ctx.route = Route::Refused(outcome.clone()).name();
            return Ok(Reply::outcome(outcome));
        }
        let mut route = route;
        let other_address = |a: &&mut String| a.contains('|') || icanbwell_conventions::is_uuid(a);
        if let Some(address) = route.group_id_mut().filter(other_address) {
            // `id|owner` of the only Group with that id, or its `_uuid`, is
            // that Group: the proxy answers for it as for `Group/{id}` (the
            // legacy server resolves the same document from the path it is
            // sent).
            let owned = address.clone();
            let plain = self
                .ask_stores(None, |service| async move {
                    service.plain_group_id(&owned).await
                })
                .await;
            match plain {
                Ok(Some(id)) => *address = id,
                Ok(None) => {}
                Err(outcome) => return Ok(Reply::outcome(outcome)),
            }
        }
        if let authorize::Access::Refused(answer) =
            authorize::check_token(self, session, ctx, &route).await?
        {
            return Ok(answer.into());
        }
        match route {
            Route::Passthrough => Ok(Reply::Forward),
            Route::Refused(outcome) => Ok(Reply::outcome(outcome)),
            Route::GroupUpdateOtherFormat { group_id } => {
                guard::write_in_other_format(self, &group_id, false).await
            }
            Route::MultiResourceWrite { .. } => guard::multi_resource_write(self, session).await,
            Route::GroupConditionalWrite => guard::conditional_write(self, session).await,
            Route::GroupRosterDependentRead {
                base,
                group_id: Some(group_id),
                what: "_history",
            } => read::group_history(self, session, ctx, &base, &group_id).await,
            Route::GroupRosterDependentRead { group_id, what, .. } => {
                guard::roster_dependent_read(self, group_id.as_deref(), what).await
            }
            Route::MemberJoinSearch { parameter } => {
                guard::member_join_search(self, &parameter).await
            }
            Route::GroupRead { base, group_id } => {
                read::group_read(self, session, ctx, &base, &group_id).await
            }
            Route::GroupAtrOperation {
                base,
                group_id,
                operation,
            } => member_write::atr_operation(self, session, ctx, &base, &group_id, operation).await,
            Route::GroupUpdate { base, group_id } => {
                roster_write::group_update(self, session, ctx, &base, &group_id).await
            }
            Route::GroupCreate { .. } => Ok(roster_write::group_create(self, ctx)),
            Route::GroupDelete { group_id, .. } => self.delete_group(session, ctx, &group_id).await,
            Route::GroupSearchByMember { base } => {
                search::group_member_search(self, session, ctx, &base).await
            }
            Route::GroupSearch { base } => search::group_search(self, session, ctx, &base).await,
            Route::GroupMembers { base, group_id } => {
                read::members_page(self, session, ctx, &base, &group_id).await
            }
            Route::GroupVersionRead {
                base,
                group_id,
                version,
            } => read::group_version_read(self, session, ctx, &base, &group_id, version).await,
            Route::GroupPatchOtherFormat { group_id } => {
                guard::write_in_other_format(self, &group_id, true).await
            }
            Route::GroupPatch { base, group_id } => {
                member_write::group_patch(self, session, ctx, &base, &group_id).await
            }
        }
    }

    /// Where Group `id` keeps its members (`None` with member handling off);
    /// `Err` is the answer when the stores cannot tell.
    pub(crate) async fn roster_home(
        &self,
        id: &str,
    ) -> std::result::Result<Option<crate::group::RosterHome>, Outcome> {
        let id = id.to_string();
        self.ask_stores(None, |service| async move {
            service.roster_home(&id).await.map(Some)
        })
        .await
    }

    /// Where a member write's Group keeps its members
    /// ([`crate::group::GroupService::member_write_home`]), looked up once
    /// per request: the deciding steps before a write (which may run, who
    /// may run it) ask the same question, and the write itself checks again
    /// under the Group's lock.
    pub(crate) async fn member_write_home(
        &self,
        ctx: &mut RequestContext,
        id: &str,
    ) -> std::result::Result<Option<crate::group::RosterHome>, Outcome> {
        if let Some(home) = ctx.member_write_home {
            return Ok(Some(home));
        }
        let id = id.to_string();
        let found = self
            .ask_stores(None, |service| async move {
                service.member_write_home(&id).await.map(Some)
            })
            .await?;
        let Some((home, seen)) = found else {
            return Ok(None);
        };
        ctx.member_write_home = Some(home);
        ctx.member_state_seen = seen;
        Ok(Some(home))
    }

    /// Whether any Group's roster lives in the member store (`false` with
    /// member handling off).
    pub(crate) async fn manages_any_group(&self) -> std::result::Result<bool, Outcome> {
        self.ask_stores(
            false,
            |service| async move { service.manages_any_group().await },
        )
        .await
    }

    /// Which of the Groups `ids` keep their roster in the member store.
    pub(crate) async fn managed_among(
        &self,
        ids: &[String],
    ) -> std::result::Result<Vec<String>, Outcome> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = ids.to_vec();
        self.ask_stores(Vec::new(), |service| async move {
            service.managed_among(&ids).await
        })
        .await
    }

    /// One question to the member stores on the store runtime, its failure
    /// as the answer to send; `off` when member handling is off.
    async fn ask_stores<T, F, Fut>(&self, off: T, ask: F) -> std::result::Result<T, Outcome>
    where
        T: Send + 'static,
        F: FnOnce(GroupService) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, crate::group::GroupError>>
            + Send
            + 'static,
    {
        let Some(service) = self.group_service.clone() else {
            return Ok(off);
        };
        match self.on_stores(ask(service)).await {
            Ok(answer) => answer.map_err(|error| error.to_outcome()),
            Err(outcome) => Err(outcome),
        }
    }

    /// DELETE of a Group: the legacy server deletes it; a migrated Group's
    /// roster is then tombstoned. Not migrated: forward as usual.
    async fn delete_group(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
        group_id: &str,
    ) -> Result<Reply> {
        let Some(service) = self.group_service.clone() else {
            return Ok(Reply::Forward);
        };
        let mut request = session.req_header().clone();
        self.rewrite_for_upstream(session, &mut request, ctx)?;
        let client = self.upstream_client.clone();
        let delete_upstream =
            async move { client.send_buffered(&request, bytes::Bytes::new()).await };
        let (id, request_id) = (group_id.to_string(), ctx.request_id.clone());
        let result = self
            .on_stores(async move {
                service
                    .delete_migrated(&id, &request_id, delete_upstream)
                    .await
            })
            .await;
        // Once started, the delete may have reached the upstream: it is never
        // forwarded a second time, whatever happened.
        let outcome = match result {
            Ok(Ok(None)) => return Ok(Reply::Forward),
            Ok(Ok(Some(reply))) => return Ok(Reply::relay(reply)),
            Ok(Err(error)) => {
                tracing::warn!(group = group_id, %error, "Group delete failed");
                error.to_outcome()
            }
            Err(outcome) => outcome,
        };
        Ok(Reply::outcome(outcome))
    }

    /// Carries out an inspected request's reply, and turns it into
    /// pingora's `request_filter` answer: `true` when the response is written.
    async fn finish_intercept(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
        reply: Reply,
    ) -> Result<bool> {
        match reply {
            Reply::Answer(answer) => {
                respond::send(session, ctx, answer).await?;
                Ok(true)
            }
            Reply::Forward => Ok(false),
            Reply::ForwardWithBody(body) => {
                self.forward_with_body(session, ctx, body).await?;
                Ok(true)
            }
        }
    }

    /// Sends the request on with a body we already hold (beyond pingora's replay buffer).
    async fn forward_with_body(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
        body: bytes::Bytes,
    ) -> Result<()> {
        let mut request = session.req_header().clone();
        self.rewrite_for_upstream(session, &mut request, ctx)?;
        if let Err(outcome) = self.upstream_client.forward(session, &request, body).await {
            respond::send_outcome(session, &outcome, &ctx.request_id).await?;
        }
        Ok(())
    }

    /// The legacy server's half of a member write: the same request (headers,
    /// credentials) with `body` instead (the non-member ops of a split patch,
    /// or a PUT's Group without `member`), conditional on the version the
    /// member half was planned against.
    /// The legacy server's half of a split write (see
    /// [`crate::group::write::UpstreamPart`]): always a `PUT` of the Group
    /// with `If-Match`, with the client's credentials and the usual rewrite.
    pub(crate) fn conditional_upstream_write(
        &self,
        session: &Session,
        ctx: &RequestContext,
        document: crate::group::write::UpstreamDocument,
    ) -> Result<crate::group::write::UpstreamPart> {
        let mut request = session.req_header().clone();
        self.rewrite_for_upstream(session, &mut request, ctx)?;
        request.remove_header(&http::header::EXPECT);
        request.set_method(http::Method::PUT);
        request.insert_header(http::header::CONTENT_TYPE, "application/fhir+json")?;
        let client = self.upstream_client.clone();
        Ok(crate::group::write::UpstreamPart {
            document,
            put: Box::new(move |version: u64, body: bytes::Bytes| {
                let mut request = request.clone();
                let client = client.clone();
                Box::pin(async move {
                    request
                        .insert_header(http::header::IF_MATCH, format!("W/\"{version}\""))
                        .map_err(|e| Outcome::error(500, IssueType::Exception, e.to_string()))?;
                    client.send_buffered(&request, body).await
                })
            }),
        })
    }

    pub(crate) fn rewrite_for_upstream(
        &self,
        session: &Session,
        upstream_request: &mut pingora::http::RequestHeader,
        ctx: &RequestContext,
    ) -> Result<()> {
        let client_ip = session
            .client_addr()
            .and_then(|addr| addr.as_inet())
            .map(|inet| inet.ip().to_string());
        let host = session
            .req_header()
            .headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .map(str::to_string);
        let facts = ClientFacts {
            client_ip,
            host: host.as_deref(),
            request_id: &ctx.request_id,
        };
        if ctx.continue_sent {
            upstream_request.remove_header(&http::header::EXPECT);
        }
        rewrite_upstream_request(
            upstream_request,
            &self.config.upstream,
            &self.target,
            &facts,
        )
    }

    fn upstream_peer_for_request(&self) -> HttpPeer {
        let settings = &self.config.upstream;
        let mut peer = HttpPeer::new(self.upstream_addr, false, self.target.host.clone());
        peer.options.connection_timeout = Some(settings.connect_timeout());
        peer.options.total_connection_timeout = Some(settings.connect_timeout());
        peer.options.read_timeout = Some(settings.read_timeout());
        peer.options.write_timeout = Some(settings.write_timeout());
        peer.options.idle_timeout = Some(settings.idle_timeout());
        peer
    }
}

#[async_trait]
impl ProxyHttp for FhirGroupProxy {
    type CTX = RequestContext;

    fn new_ctx(&self) -> Self::CTX {
        RequestContext {
            request_id: String::new(),
            continue_sent: false,
            intercepted: false,
            route: Route::Passthrough.name(),
            trace_id: None,
            created: None,
            refusal: None,
            member_write_home: None,
            member_state_seen: None,
            started: Instant::now(),
            span: tracing::Span::none(),
            _in_flight: self.lifecycle.track_request(),
        }
    }

    async fn early_request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<()> {
        // HTTP/1.1 pipelining (RFC 9112 §9.3.2): a request sent behind another
        // is answered in order, not dropped with the connection.
        session.as_downstream_mut().set_pipelining_enabled(true);
        let headers = &session.req_header().headers;
        match forwarding::client_request_id(headers) {
            Ok(Some(id)) => ctx.request_id = id,
            Ok(None) => ctx.request_id = uuid::Uuid::new_v4().to_string(),
            Err(outcome) => ctx.refusal = Some(outcome),
        }
        ctx.trace_id = headers
            .get(trace_context::TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(trace_context::trace_id)
            .map(str::to_string);
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        let route = route::route(session.req_header(), &self.config.fhir.base_paths);
        ctx.route = route.name();
        if matches!(route, Route::Passthrough) && ctx.refusal.is_none() {
            // Nothing on the way upstream logs, and the access line names the
            // request itself: a span here would be made and dropped unused.
            self.answer_expect_continue(session, ctx).await?;
            return Ok(false);
        }
        ctx.span = tracing::info_span!(
            "request",
            request_id = %ctx.request_id,
            trace_id = ctx.trace_id.as_deref(),
        );
        let span = ctx.span.clone();
        let next = self
            .route_request(session, ctx, route)
            .instrument(span.clone())
            .await?;
        self.finish_intercept(session, ctx, next)
            .instrument(span)
            .await
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.upstream_peer_for_request()))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        self.rewrite_for_upstream(session, upstream_request, ctx)
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if !upstream_response.headers.contains_key(X_REQUEST_ID) {
            upstream_response.insert_header(X_REQUEST_ID, ctx.request_id.clone())?;
        }
        if upstream_response.status == http::StatusCode::CREATED {
            // Before the client hears of the new Group, so no write of it can
            // race its adoption.
            if let Some(id) = ctx.created.take().and_then(|c| c.id(upstream_response)) {
                let span = ctx.span.clone();
                roster_write::adopt_created(self, ctx, id)
                    .instrument(span)
                    .await;
            }
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let outcome = failure::outcome_for_proxy_error(e);
        if let (pingora::ErrorSource::Upstream, Some(outcome)) = (e.esource(), &outcome) {
            metrics().upstream_error(outcome.status, UpstreamClientKind::Pingora);
        }
        let Some(outcome) = outcome else {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        if let Err(write_error) = respond::send_outcome(session, &outcome, &ctx.request_id).await {
            tracing::debug!(%write_error, "could not send the error response");
        }
        FailToProxy {
            error_code: outcome.status,
            can_reuse_downstream: false,
        }
    }

    /// The access log line and the request metrics.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Self::CTX) {
        let status = session
            .response_written()
            .map_or(0, |resp| resp.status.as_u16());
        let request = session.req_header();
        let elapsed = ctx.started.elapsed();
        let disposition = if ctx.intercepted {
            Disposition::Intercepted
        } else {
            Disposition::Forwarded
        };
        metrics().request_done(ctx.route, &request.method, status, disposition, elapsed);
        let duration_ms = elapsed.as_micros() as f64 / 1_000.0;
        match e {
            Some(error) => tracing::warn!(
                request_id = %ctx.request_id,
                trace_id = ctx.trace_id.as_deref(),
                method = %request.method,
                path = %request.uri.path(),
                status,
                duration_ms,
                route = ctx.route,
                intercepted = ctx.intercepted,
                error = %error,
                "request failed"
            ),
            None => tracing::info!(
                request_id = %ctx.request_id,
                trace_id = ctx.trace_id.as_deref(),
                method = %request.method,
                path = %request.uri.path(),
                status,
                duration_ms,
                route = ctx.route,
                intercepted = ctx.intercepted,
                "request done"
            ),
        }
    }
}

/// The pingora server with the proxy service, the admin listener, and what
/// graceful shutdown needs to drain.
pub struct ProxyServer {
    server: Server,
    lifecycle: Arc<Lifecycle>,
    store_tasks: StoreTasks,
    shutdown: ShutdownSettings,
    /// Keeps the store runtime alive until `run` returns: the last owner
    /// must not be pingora's service, dropped inside its own runtime.
    _store_runtime: Arc<StoreRuntime>,
}

impl ProxyServer {
    /// Serves until SIGTERM/SIGINT, then drains (see [`crate::operations::shutdown`]).
    pub fn run(self) -> std::io::Result<ShutdownSummary> {
        crate::operations::shutdown::run_until_drained(
            self.server,
            self.lifecycle,
            &self.store_tasks,
            self.shutdown,
        )
    }
}

/// Bytes of a response pingora may hold before writing to the client. Its
/// default (1460, one MSS) sends the head of a 2 KB resource and its body in
/// two writes, two TCP segments; this sends resources up to 16 KiB in one.
/// Chunked bodies are still written chunk by chunk as they arrive; pingora
/// writes a content-length response (head included) when this much has
/// gathered or the body is complete.
const CLIENT_WRITE_BUFFER: usize = 16 * 1024;

/// The client-facing listener on `listen`, with the write buffer above:
/// the proxy's, and the bare pingora the passthrough bench measures it
/// against (`examples/bare_pingora_proxy.rs`), so both listen alike.
pub fn client_listener(listen: String) -> pingora::listeners::ListenerConfig {
    pingora::listeners::ListenerConfig::tcp(listen)
        .l4_buffer(pingora::listeners::L4BufferSettings::default().write(CLIENT_WRITE_BUFFER))
}

/// Builds the pingora server with the proxy service listening on
/// `server.listen`, and starts the admin listener on `server.admin_listen`.
pub fn build_server(config: Config) -> Result<ProxyServer, ProxyError> {
    let threads = match config.server.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let shutdown = ShutdownSettings {
        grace_period: Duration::from_secs(config.server.grace_period_seconds),
        drain_timeout: Duration::from_secs(config.server.graceful_shutdown_timeout_seconds),
    };
    let server_conf = ServerConf {
        threads,
        // pingora keeps its runtimes (and so the requests on them) alive this
        // long after it stops accepting; the drain in `run` ends the process
        // as soon as nothing is left, at the latest after the same time.
        grace_period_seconds: Some(config.server.graceful_shutdown_timeout_seconds),
        graceful_shutdown_timeout_seconds: Some(1),
        // Work stealing stays on (pingora's default). Without it, an idle
        // upstream connection returned to the pool by one thread's runtime
        // is still held by its idle watcher there when another thread takes
        // it: pingora drops it, logs "failed to acquire reusable stream" at
        // ERROR, and connects again (seen in the tests with it off).
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), server_conf);
    server.bootstrap();

    let listen = config.server.listen.clone();
    let admin_listen = config.server.admin_listen.clone();
    let lifecycle = Lifecycle::new();
    let proxy = FhirGroupProxy::new(Arc::new(config), lifecycle.clone())?;
    if !admin_listen.is_empty() {
        proxy.start_admin_listener(&admin_listen)?;
    }
    let store_tasks = proxy.store_runtime.clone();
    let store_runtime = proxy.store_runtime_owner.clone();
    let mut service = http_proxy_service(&server.configuration, proxy);
    service.add_listener(client_listener(listen));
    server.add_service(service);
    Ok(ProxyServer {
        server,
        lifecycle,
        store_tasks,
        shutdown,
        _store_runtime: store_runtime,
    })
}
