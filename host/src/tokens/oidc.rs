//! Tokens of trusted OpenID Connect providers (`[tokens.trusted_issuers]`):
//! RS256 and ES256, verified with the provider's published keys (JWKS).
//!
//! Keys are fetched on first use and kept for `jwks_cache_seconds`. A token
//! that names a key not in the set fetches it again at once, because
//! providers rotate by publishing a new key and signing with it soon after;
//! such fetches are at most one per [`MIN_REFETCH`] per provider, so a
//! client inventing key ids cannot make the host hammer the provider. One
//! fetch runs at a time; requests arriving meanwhile wait for it rather
//! than start their own. When the provider cannot be reached, keys already
//! fetched keep being used past their time (a provider's outage should not
//! sign everyone out), and with none the request is answered 503, not 401:
//! the token may be fine.
//!
//! Algorithm confusion is closed at both ends: a key is used only with the
//! algorithm its type and `alg` say (RSA: RS256, P-256: ES256), and the
//! token's header must name that algorithm. HS256 tokens never reach this
//! module (they are the host's own), so a provider's public key can never
//! be taken for an HMAC secret.

use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Header, Validation};
use serde_json::{Map, Value};

use super::{ExternalUser, Rejection, Verified, LEEWAY_SECONDS};
use crate::bindings::tokens::Claims;
use crate::plugins::{is_role_name, TrustedIssuerSettings};

/// The least time between two fetches of a provider's keys for a key id
/// not in the set.
const MIN_REFETCH: Duration = Duration::from_secs(10);
/// How long a key fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A key set is a few KiB; a provider sending more is not sending keys.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// User ids travel in a header and in rows: printable ASCII, bounded.
const MAX_SUBJECT_LEN: usize = 200;

struct Key {
    id: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

struct KeySet {
    keys: Vec<Key>,
    fetched: Instant,
}

impl KeySet {
    fn find(&self, header: &Header) -> Option<&Key> {
        let mut usable = self.keys.iter().filter(|k| k.algorithm == header.alg);
        match &header.kid {
            Some(kid) => usable.find(|k| k.id.as_deref() == Some(kid)),
            // Without a key id, only a set with one key of the algorithm
            // says which key is meant.
            None => {
                let only = usable.next()?;
                usable.next().is_none().then_some(only)
            }
        }
    }
}

pub struct TrustedIssuer {
    name: String,
    settings: TrustedIssuerSettings,
    keys: RwLock<Option<KeySet>>,
    /// Held by the one fetch in progress.
    fetching: tokio::sync::Mutex<()>,
    last_attempt: Mutex<Option<Instant>>,
}

impl TrustedIssuer {
    pub fn new(name: &str, settings: &TrustedIssuerSettings) -> TrustedIssuer {
        TrustedIssuer {
            name: name.to_owned(),
            settings: settings.clone(),
            keys: RwLock::new(None),
            fetching: tokio::sync::Mutex::new(()),
            last_attempt: Mutex::new(None),
        }
    }

    /// The provider's `iss`.
    pub fn issuer(&self) -> &str {
        &self.settings.issuer
    }

    pub async fn verify(&self, token: &str, header: &Header) -> Result<Verified, Rejection> {
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(Rejection::Invalid(format!(
                "tokens of `{}` must be signed with RS256 or ES256, not {:?}",
                self.name, header.alg
            )));
        }
        let claims = match self.decode(token, header) {
            Some(decoded) => decoded?,
            None => {
                self.refresh(true).await?;
                self.decode(token, header).unwrap_or_else(|| {
                    Err(Rejection::Invalid(format!(
                        "`{}` has no signing key {}",
                        self.name,
                        header
                            .kid
                            .as_deref()
                            .map_or("for a token without `kid`".to_owned(), |k| format!("`{k}`"))
                    )))
                })?
            }
        };
        self.user(claims)
    }

    /// Verifies with the key set at hand; `None` when it holds no key for
    /// the token, or is due to be fetched again.
    fn decode(
        &self,
        token: &str,
        header: &Header,
    ) -> Option<Result<Map<String, Value>, Rejection>> {
        let keys = self.keys.read().unwrap();
        let set = keys.as_ref()?;
        let due = set.fetched.elapsed() >= Duration::from_secs(self.settings.jwks_cache_seconds);
        if due && self.may_fetch() {
            return None;
        }
        let key = set.find(header)?;
        let mut validation = Validation::new(key.algorithm);
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[&self.settings.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECONDS;
        Some(
            jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation)
                .map(|data| data.claims)
                .map_err(|e| match e.kind() {
                    ErrorKind::ExpiredSignature => Rejection::Expired,
                    _ => Rejection::Invalid(format!("{e} (a token of `{}`)", self.name)),
                }),
        )
    }

    fn may_fetch(&self) -> bool {
        self.last_attempt
            .lock()
            .unwrap()
            .is_none_or(|at| at.elapsed() >= MIN_REFETCH)
    }

    /// Fetches the key set, unless a fetch was tried within [`MIN_REFETCH`]
    /// (`rate_limited`) or another caller fetched it while this one waited.
    async fn refresh(&self, rate_limited: bool) -> Result<(), Rejection> {
        let attempted_before = *self.last_attempt.lock().unwrap();
        let _fetching = self.fetching.lock().await;
        let attempted = *self.last_attempt.lock().unwrap();
        let someone_else_fetched = attempted != attempted_before;
        if !someone_else_fetched && (!rate_limited || self.may_fetch()) {
            *self.last_attempt.lock().unwrap() = Some(Instant::now());
            match self.fetch().await {
                Ok(keys) => {
                    *self.keys.write().unwrap() = Some(KeySet {
                        keys,
                        fetched: Instant::now(),
                    });
                }
                Err(e) => {
                    tracing::warn!(issuer = %self.name, url = %self.settings.jwks_url, error = %format!("{e:#}"), "cannot fetch the signing keys of a trusted issuer");
                }
            }
        }
        if self.keys.read().unwrap().is_none() {
            return Err(Rejection::Unavailable(format!(
                "the signing keys of `{}` cannot be fetched; try again later",
                self.name
            )));
        }
        Ok(())
    }

    async fn fetch(&self) -> Result<Vec<Key>> {
        let request = http::Request::get(&self.settings.jwks_url)
            .header(http::header::ACCEPT, "application/json")
            .body(Bytes::new())?;
        let response =
            tokio::time::timeout(FETCH_TIMEOUT, crate::client::send(request, MAX_JWKS_BYTES))
                .await
                .map_err(|_| anyhow::anyhow!("no answer within {FETCH_TIMEOUT:?}"))??;
        if response.status() != http::StatusCode::OK {
            bail!("the key set answered {}", response.status());
        }
        #[derive(serde::Deserialize)]
        struct Set {
            keys: Vec<Value>,
        }
        let set: Set =
            serde_json::from_slice(response.body()).context("the key set is not JWKS")?;
        // Keys this host cannot use (encryption keys, other algorithms) are
        // skipped one by one rather than failing the set.
        let keys: Vec<Key> = set
            .keys
            .into_iter()
            .filter_map(|value| serde_json::from_value::<Jwk>(value).ok())
            .filter_map(|jwk| signing_key(&jwk))
            .collect();
        if keys.is_empty() {
            bail!("the key set holds no RS256 or ES256 signing key");
        }
        tracing::info!(issuer = %self.name, keys = keys.len(), "fetched the signing keys of a trusted issuer");
        Ok(keys)
    }

    /// The verified claims as the host's user: `<name>:<subject>`, with the
    /// roles the operator lets this provider give.
    fn user(&self, claims: Map<String, Value>) -> Result<Verified, Rejection> {
        let settings = &self.settings;
        let subject = claims
            .get(&settings.user_claim)
            .and_then(Value::as_str)
            .filter(|s| {
                !s.is_empty()
                    && s.len() <= MAX_SUBJECT_LEN
                    && s.bytes().all(|b| b.is_ascii_graphic())
            })
            .ok_or_else(|| {
                Rejection::Invalid(format!(
                    "a token of `{}` needs the claim `{}`: printable ASCII, at most {MAX_SUBJECT_LEN} characters",
                    self.name, settings.user_claim
                ))
            })?;
        let mut roles = settings.default_roles.clone();
        if let Some(claim) = &settings.roles_claim {
            let named: Vec<&str> = match claims.get(claim) {
                Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
                Some(Value::String(names)) => names.split_whitespace().collect(),
                _ => Vec::new(),
            };
            for role in named {
                if is_role_name(role)
                    && settings.allowed_roles.iter().any(|r| r == role)
                    && !roles.iter().any(|r| r == role)
                {
                    roles.push(role.to_owned());
                }
            }
        }
        let text = |name: &str| {
            claims
                .get(name)
                .and_then(Value::as_str)
                .map(|s| s.chars().take(320).collect::<String>())
        };
        let seconds = |name: &str| claims.get(name).and_then(Value::as_u64).unwrap_or(0);
        let id = format!("{}:{subject}", self.name);
        Ok(Verified {
            claims: Claims {
                subject: id.clone(),
                roles,
                issued_at: seconds("iat"),
                expires_at: seconds("exp"),
            },
            external: Some(ExternalUser {
                id,
                issuer: self.name.clone(),
                subject: subject.to_owned(),
                email: text("email"),
                email_verified: claims
                    .get("email_verified")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                name: text("name"),
            }),
        })
    }
}

/// A JWK as a verification key, if it is an RS256 or ES256 signing key.
fn signing_key(jwk: &Jwk) -> Option<Key> {
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
        return None;
    }
    let algorithm = match (&jwk.algorithm, jwk.common.key_algorithm) {
        (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
        (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
            if ec.curve == EllipticCurve::P256 =>
        {
            Algorithm::ES256
        }
        _ => return None,
    };
    Some(Key {
        id: jwk.common.key_id.clone(),
        algorithm,
        key: DecodingKey::from_jwk(jwk).ok()?,
    })
}
