//! `agora:platform/tokens`: JWTs signed by the host (HS256).
//!
//! The key never enters a component: components ask the host to issue and
//! verify. The gateway verifies bearer tokens with the same [`Signer`].

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use wasmtime::component::{HasSelf, Linker};

use crate::bindings::tokens::{self as wit, Claims, Error, IssuedToken};
use crate::capability::Capability;
use crate::plugins::{ComponentSpec, Grant, TokenSettings};
use crate::state::InstanceState;

/// Key length: 256 bits, HS256's own strength.
const KEY_BYTES: usize = 32;
/// Clock skew tolerated between hosts sharing the key.
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

    pub fn issue(
        &self,
        subject: &str,
        roles: &[String],
        ttl: Option<u64>,
    ) -> Result<IssuedToken, Error> {
        let now = crate::now_millis() / 1000;
        let ttl = ttl.unwrap_or(self.ttl_seconds);
        let claims = JwtClaims {
            sub: subject.to_owned(),
            roles: roles.to_vec(),
            iat: now,
            exp: now + ttl,
            iss: self.issuer.clone(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        Ok(IssuedToken {
            token,
            expires_in: ttl,
        })
    }

    pub fn verify(&self, token: &str) -> Result<Claims, Error> {
        let data = jsonwebtoken::decode::<JwtClaims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => Error::Expired,
                _ => Error::Invalid(e.to_string()),
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

pub struct TokensCapability {
    signer: Arc<Signer>,
}

impl TokensCapability {
    pub fn init(settings: &TokenSettings, data_dir: &Path) -> Result<Self> {
        let path = settings
            .key_file
            .clone()
            .unwrap_or_else(|| data_dir.join("tokens.key"));
        let key = load_or_create_key(&path)?;
        Ok(TokensCapability {
            signer: Arc::new(Signer::new(&key, settings)),
        })
    }

    pub fn signer(&self) -> Arc<Signer> {
        self.signer.clone()
    }
}

#[async_trait]
impl Capability for TokensCapability {
    const GRANT: Grant = Grant::Tokens;
    const INTERFACES: &'static [&'static str] = &["agora:platform/tokens"];
    type ComponentState = Arc<Signer>;

    fn add_to_linker(linker: &mut Linker<InstanceState>) -> Result<()> {
        Ok(wit::add_to_linker::<_, HasSelf<InstanceState>>(
            linker,
            |s| s,
        )?)
    }

    async fn configure(&self, _component: &str, _spec: &ComponentSpec) -> Result<Arc<Signer>> {
        Ok(self.signer.clone())
    }
}

impl InstanceState {
    fn signer(&self) -> wasmtime::Result<&Signer> {
        self.caps
            .tokens
            .as_deref()
            .ok_or_else(|| wasmtime::format_err!("tokens are not granted to `{}`", self.caps.name))
    }
}

impl wit::Host for InstanceState {
    async fn issue(
        &mut self,
        subject: String,
        roles: Vec<String>,
        ttl_seconds: Option<u64>,
    ) -> wasmtime::Result<Result<IssuedToken, Error>> {
        Ok(self.signer()?.issue(&subject, &roles, ttl_seconds))
    }

    async fn verify(&mut self, token: String) -> wasmtime::Result<Result<Claims, Error>> {
        Ok(self.signer()?.verify(&token))
    }
}
