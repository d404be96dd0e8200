//! Who may read `/metrics`. The plugin's metrics name every claim on the node (namespace and
//! name), so on a cluster shared by teams they are for the monitoring system, not for any pod
//! that can reach the node's port.
//!
//! With `--metrics-auth=kubernetes` the endpoint is served over TLS and asks the API server, as
//! kube-rbac-proxy does for node exporters: the scraper's bearer token goes to a TokenReview,
//! the user it names to a SubjectAccessReview for `get` on the non-resource URL `/metrics`.
//! Missing or rejected tokens get 401, users without the permission 403; a decision is kept for
//! a minute so a scrape every few seconds costs the API server two reviews a minute per scraper.
//! `/healthz` stays open for the kubelet's probe.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::Api;
use kube::api::PostParams;

/// The path a scraper needs `get` on.
pub const METRICS_PATH: &str = "/metrics";
/// How long a decision on one token is kept.
const DECISION_TTL: Duration = Duration::from_secs(60);
/// Decisions kept at most; beyond it the cache starts afresh (a scraper fleet is small; a
/// client cycling through junk tokens must not grow it without bound).
const CACHE_LIMIT: usize = 1024;

/// What a token may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// No token, or one the API server does not accept.
    Unauthenticated(String),
    /// A user without `get` on `/metrics`.
    Forbidden(String),
}

/// Decides through the API server, with a short-lived cache.
pub struct Authorizer {
    tokens: Api<TokenReview>,
    access: Api<SubjectAccessReview>,
    cache: Mutex<HashMap<String, (Instant, Decision)>>,
}

impl Authorizer {
    pub fn new(client: kube::Client) -> Authorizer {
        Authorizer {
            tokens: Api::all(client.clone()),
            access: Api::all(client),
            cache: Mutex::default(),
        }
    }

    /// The decision for `token`; `Err` when the API server could not be asked (not cached:
    /// the next scrape asks again).
    pub async fn decide(&self, token: &str) -> Result<Decision, kube::Error> {
        if let Some((at, decision)) = self.cache().get(token)
            && at.elapsed() < DECISION_TTL
        {
            return Ok(decision.clone());
        }
        let decision = self.review(token).await?;
        let mut cache = self.cache();
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(token.to_string(), (Instant::now(), decision.clone()));
        Ok(decision)
    }

    async fn review(&self, token: &str) -> Result<Decision, kube::Error> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: None,
            },
            ..Default::default()
        };
        let status = self
            .tokens
            .create(&PostParams::default(), &review)
            .await?
            .status
            .unwrap_or_default();
        let user = match (status.authenticated, status.user) {
            (Some(true), Some(user)) => user,
            _ => {
                return Ok(Decision::Unauthenticated(status.error.unwrap_or_else(
                    || "the API server did not accept the token".into(),
                )));
            }
        };
        let name = user.username.clone().unwrap_or_default();
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(METRICS_PATH.into()),
                    verb: Some("get".into()),
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let status = self
            .access
            .create(&PostParams::default(), &review)
            .await?
            .status
            .unwrap_or_default();
        Ok(if status.allowed {
            Decision::Allowed
        } else {
            Decision::Forbidden(format!(
                "{name} may not get {METRICS_PATH}{}",
                status
                    .reason
                    .filter(|r| !r.is_empty())
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ))
        })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Decision)>> {
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Middleware in front of `/metrics`: passes the request on only for an allowed token.
pub async fn require_authorized(
    State(authorizer): State<Arc<Authorizer>>,
    request: Request,
    next: Next,
) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty());
    let Some(token) = token else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "a bearer token is required (--metrics-auth=kubernetes)".into(),
        );
    };
    match authorizer.decide(token).await {
        Ok(Decision::Allowed) => next.run(request).await,
        Ok(Decision::Unauthenticated(why)) => refuse(StatusCode::UNAUTHORIZED, why),
        Ok(Decision::Forbidden(why)) => refuse(StatusCode::FORBIDDEN, why),
        Err(error) => {
            tracing::warn!(error = %tessera_api::error_chain::Chain(&error), "could not review a scraper's token");
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "the API server could not be asked about the token".into(),
            )
        }
    }
}

fn refuse(status: StatusCode, why: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::WWW_AUTHENTICATE, "Bearer"),
        ],
        format!("{why}\n"),
    )
        .into_response()
}
