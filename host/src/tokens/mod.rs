//! JWTs signed by the host (HS256), as two capabilities:
//! `agora:platform/tokens` (grant `tokens`) verifies, and
//! `agora:platform/token-issuer` (grant `tokens-issue`) issues.
//!
//! The key never enters a component: components ask the host to issue and
//! verify. The gateway verifies bearer tokens with the same [`Signer`].
//!
//! Issuing is split from verifying because a token is a credential the
//! gateway trusts: a component that may issue one can act as any user. So
//! issuing is a grant of its own, refused at load to a component without it
//! (the grant check works per interface), and the host puts into a token
//! only the roles plugins.toml lists for the issuing component
//! (`issues_roles`), so even the component that logs users in cannot make
//! anyone a role it was not given. Lifetimes are capped at the host's
//! `ttl_seconds`, so no component can mint a standing credential.
//!
//! Beside its own, the host accepts the tokens of trusted OpenID Connect
//! providers ([`oidc`]); the [`Authenticator`] tells them apart by their
//! algorithm (the host's are HS256, a provider's RS256 or ES256) and
//! issuer, and both the gateway and `verify` go through it.

mod oidc;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use wasmtime::component::Linker;

use crate::bindings::token_issuer::{self as issuer_wit, Error as IssueError, IssuedToken};
use crate::bindings::tokens::{self as wit, Claims, Error};
use crate::capability::{Capability, CapabilityView, View};
use crate::plugins::{ComponentSpec, Grant, TokenSettings};
use crate::state::InstanceState;
use oidc::TrustedIssuer;

/// Key length: 256 bits, HS256's own strength.
const KEY_BYTES: usize = 32;
/// Clock skew tolerated between hosts sharing the key, and with providers.
const LEEWAY_SECONDS: u64 = 5;

pub struct Signer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    ttl_seconds: u64,
}

#[derive(Serialize, Deserialize)]
struct JwtClaims {
    sub: String,
    roles: Vec<String>,
    iat: u64,
    exp: u64,
    iss: String,
}

impl Signer {
    pub fn new(key: &[u8], settings: &TokenSettings) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[&settings.issuer]);
        validation.leeway = LEEWAY_SECONDS;
        Signer {
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
            validation,
            issuer: settings.issuer.clone(),
            ttl_seconds: settings.ttl_seconds,
        }
    }

    /// Signs a token; the roles must already be checked ([`Issuer::issue`]).
    fn issue(
        &self,
        subject: &str,
        roles: &[String],
        ttl: Option<u64>,
    ) -> Result<IssuedToken, IssueError> {
        let now = crate::now_millis() / 1000;
        let ttl = ttl.unwrap_or(self.ttl_seconds);
        if ttl > self.ttl_seconds {
            return Err(IssueError::Invalid(format!(
                "a token may live at most {} s (tokens.ttl_seconds), not {ttl} s",
                self.ttl_seconds
            )));
        }
        if subject.is_empty() || subject.chars().any(char::is_control) {
            return Err(IssueError::Invalid(
                "the subject must be non-empty printable text".into(),
            ));
        }
        let claims = JwtClaims {
            sub: subject.to_owned(),
            roles: roles.to_vec(),
            iat: now,
            exp: now + ttl,
            iss: self.issuer.clone(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| IssueError::Invalid(e.to_string()))?;
        Ok(IssuedToken {
            token,
            expires_in: ttl,
        })
    }

    /// Verifies one of the host's own tokens ([`Authenticator::verify`]
    /// chooses which tokens are).
    fn verify(&self, token: &str) -> Result<Claims, Rejection> {
        let data = jsonwebtoken::decode::<JwtClaims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => Rejection::Expired,
                _ => Rejection::Invalid(e.to_string()),
            })?;
        let c = data.claims;
        Ok(Claims {
            subject: c.sub,
            roles: c.roles,
            issued_at: c.iat,
            expires_at: c.exp,
        })
    }
}

/// Why a bearer token was not accepted.
#[derive(Debug, Clone)]
pub enum Rejection {
    Invalid(String),
    Expired,
    /// The token's provider could not be asked for its keys: the token may
    /// be fine, so this is the host's failure (503), not the client's.
    Unavailable(String),
}

impl From<Rejection> for Error {
    fn from(rejection: Rejection) -> Error {
        match rejection {
            Rejection::Invalid(m) | Rejection::Unavailable(m) => Error::Invalid(m),
            Rejection::Expired => Error::Expired,
        }
    }
}

/// A verified token's user.
#[derive(Debug, Clone)]
pub struct Verified {
    pub claims: Claims,
    /// Set for a user of a trusted provider.
    pub external: Option<ExternalUser>,
}

/// A user signed in at a trusted provider, as `agora:platform/accounts`
/// is told about them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalUser {
    /// `<issuer name>:<subject>`: the user id every component sees.
    pub id: String,
    /// The name of the provider in `[tokens.trusted_issuers]`.
    pub issuer: String,
    pub subject: String,
    pub email: Option<String>,
    pub email_verified: bool,
    pub name: Option<String>,
}

/// Verifies bearer tokens: the host's own and those of trusted providers.
pub struct Authenticator {
    signer: Arc<Signer>,
    trusted: Vec<TrustedIssuer>,
}

impl Authenticator {
    pub fn new(signer: Arc<Signer>, settings: &TokenSettings) -> Authenticator {
        Authenticator {
            signer,
            trusted: settings
                .trusted_issuers
                .iter()
                .map(|(name, trusted)| TrustedIssuer::new(name, trusted))
                .collect(),
        }
    }

    pub async fn verify(&self, token: &str) -> Result<Verified, Rejection> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| Rejection::Invalid(format!("not a JWT: {e}")))?;
        if header.alg == Algorithm::HS256 {
            return self.signer.verify(token).map(|claims| Verified {
                claims,
                external: None,
            });
        }
        let issuer = unverified_issuer(token)?;
        let trusted = self
            .trusted
            .iter()
            .find(|t| t.issuer() == issuer)
            .ok_or_else(|| {
                Rejection::Invalid(format!(
                    "tokens of {issuer:?} are not trusted (tokens.trusted_issuers)"
                ))
            })?;
        // Boxed: checking an external issuer's token may fetch its keys over
        // HTTP, a future of kilobytes, which would otherwise be part of
        // every request's future, moved by hyper at each request.
        Box::pin(trusted.verify(token, &header)).await
    }
}

/// The `iss` a token claims, read before its signature is checked, only to
/// choose the keys that check it.
fn unverified_issuer(token: &str) -> Result<String, Rejection> {
    #[derive(Deserialize)]
    struct Issuer {
        iss: String,
    }
    let mut peek = Validation::new(Algorithm::RS256);
    peek.insecure_disable_signature_validation();
    peek.validate_exp = false;
    peek.validate_aud = false;
    peek.set_required_spec_claims::<&str>(&[]);
    jsonwebtoken::decode::<Issuer>(token, &DecodingKey::from_secret(&[]), &peek)
        .map(|data| data.claims.iss)
        .map_err(|e| Rejection::Invalid(format!("the token names no issuer: {e}")))
}

/// Reads the signing key, creating it on first start.
fn load_or_create_key(path: &Path) -> Result<Vec<u8>> {
    let key = crate::secret::load_or_create(path, "token signing key", || {
        crate::secret::random_bytes(KEY_BYTES)
    })?;
    if key.len() < KEY_BYTES {
        anyhow::bail!("{} holds fewer than {KEY_BYTES} bytes", path.display());
    }
    Ok(key)
}

/// Verifying: `agora:platform/tokens`, grant `tokens`. Also owns the
/// [`Signer`], which [`TokenIssuerCapability`] shares, and the
/// [`Authenticator`], which the gateway shares.
pub struct TokensCapability {
    signer: Arc<Signer>,
    authenticator: Arc<Authenticator>,
}

impl TokensCapability {
    pub fn init(settings: &TokenSettings, data_dir: &Path) -> Result<Self> {
        let path = settings
            .key_file
            .clone()
            .unwrap_or_else(|| data_dir.join("tokens.key"));
        let key = load_or_create_key(&path)?;
        let signer = Arc::new(Signer::new(&key, settings));
        Ok(TokensCapability {
            authenticator: Arc::new(Authenticator::new(signer.clone(), settings)),
            signer,
        })
    }

    pub fn authenticator(&self) -> Arc<Authenticator> {
        self.authenticator.clone()
    }
}

#[async_trait]
impl Capability for TokensCapability {
    const GRANT: Grant = Grant::Tokens;
    const INTERFACES: &'static [&'static str] = &["agora:platform/tokens"];
    type ComponentState = Arc<Authenticator>;

    fn add_to_linker(linker: &mut Linker<InstanceState>) -> Result<()> {
        Ok(wit::add_to_linker::<_, View<Arc<Authenticator>>>(
            linker,
            |s| s.view(Grant::Tokens, |c| c.tokens.as_ref()),
        )?)
    }

    async fn configure(
        &self,
        _component: &str,
        _spec: &ComponentSpec,
    ) -> Result<Arc<Authenticator>> {
        Ok(self.authenticator.clone())
    }
}

/// Issuing: `agora:platform/token-issuer`, grant `tokens-issue`.
pub struct TokenIssuerCapability {
    signer: Arc<Signer>,
}

impl TokenIssuerCapability {
    pub fn new(tokens: &TokensCapability) -> Self {
        TokenIssuerCapability {
            signer: tokens.signer.clone(),
        }
    }
}

/// What one component may issue.
pub struct Issuer {
    signer: Arc<Signer>,
    component: String,
    roles: BTreeSet<String>,
}

impl Issuer {
    fn issue(
        &self,
        subject: &str,
        roles: &[String],
        ttl: Option<u64>,
    ) -> Result<IssuedToken, IssueError> {
        if let Some(role) = roles.iter().find(|r| !self.roles.contains(*r)) {
            return Err(IssueError::RoleNotGranted(format!(
                "component `{}` may not issue the role {role:?} (plugins.toml \
                 components.{}.issues_roles)",
                self.component, self.component
            )));
        }
        self.signer.issue(subject, roles, ttl)
    }
}

#[async_trait]
impl Capability for TokenIssuerCapability {
    const GRANT: Grant = Grant::TokensIssue;
    const INTERFACES: &'static [&'static str] = &["agora:platform/token-issuer"];
    type ComponentState = Issuer;

    fn add_to_linker(linker: &mut Linker<InstanceState>) -> Result<()> {
        Ok(issuer_wit::add_to_linker::<_, View<Issuer>>(linker, |s| {
            s.view(Grant::TokensIssue, |c| c.token_issuer.as_ref())
        })?)
    }

    async fn configure(&self, component: &str, spec: &ComponentSpec) -> Result<Issuer> {
        Ok(Issuer {
            signer: self.signer.clone(),
            component: component.to_owned(),
            roles: spec.issues_roles.iter().cloned().collect(),
        })
    }
}

impl wit::Host for CapabilityView<'_, Arc<Authenticator>> {
    async fn verify(&mut self, token: String) -> wasmtime::Result<Result<Claims, Error>> {
        let authenticator = self.granted()?.clone();
        Ok(authenticator
            .verify(&token)
            .await
            .map(|verified| verified.claims)
            .map_err(Error::from))
    }
}

impl issuer_wit::Host for CapabilityView<'_, Issuer> {
    async fn issue(
        &mut self,
        subject: String,
        roles: Vec<String>,
        ttl_seconds: Option<u64>,
    ) -> wasmtime::Result<Result<IssuedToken, IssueError>> {
        Ok(self.granted()?.issue(&subject, &roles, ttl_seconds))
    }
}
