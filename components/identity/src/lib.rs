//! identity: registration, login and profiles. Passwords are hashed with
//! argon2id; login issues a JWT through the host (which keeps the key).
//! Roles are derived, not stored: everyone is a `customer`, and the emails
//! in the `admin_emails` setting are also `admin`, so changing the setting
//! takes effect at the next login.
//!
//! Password guessing is limited twice. The gateway counts login attempts
//! per client address (plugins.toml, `per = "address"`), which stops one
//! client trying many accounts; this component counts them per target
//! account, in its cache, which stops many clients (a botnet, or one client
//! with many addresses) trying one account: only the email tells which
//! account a guess is for, and only this component reads it. See
//! [`LoginLimit`] for the default and its trade-off.
//!
//! Exports `agora:shop/users` so other services can look a user up, and
//! publishes each user's contact (`user.registered`, `user.updated` when
//! the name changes) so that they can keep their own copy instead.
//!
//! Users who sign in at a trusted OpenID Connect provider (plugins.toml
//! `[tokens.trusted_issuers]`) get a record of their own on first use
//! (`agora:platform/accounts`, this component being `[tokens] accounts`):
//! no password, never found by email at login, and their roles are the ones
//! the gateway mapped from the provider's token.

use agora_sdk::accounts::{AccountProvider, ExternalUser};
use agora_sdk::prelude::*;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize};

mod shop {
    wit_bindgen::generate!({ path: "../../wit/shop", world: "identity" });
}

use shop::exports::agora::shop::users;

struct Identity;

impl Service for Identity {
    fn router() -> Router {
        Router::new()
            .post("/users", register)
            .post("/auth/login", login)
            .get("/users/me", me)
            .patch("/users/me", update_me)
    }

    fn migrations() -> Vec<Migration> {
        vec![
            Migration::new("0001_users", include_str!("../migrations/0001_users.sql")),
            Migration::new(
                "0002_external_users",
                include_str!("../migrations/0002_external_users.sql"),
            ),
        ]
    }
}

agora_sdk::service!(Identity);

impl users::Guest for Identity {
    fn get(id: String) -> Option<users::User> {
        let (user, _) = find_any(&id).ok().flatten()?;
        Some(users::User {
            id: user.id,
            email: user.email,
            name: user.name,
        })
    }
}

shop::export!(Identity with_types_in shop);

impl AccountProvider for Identity {
    fn provision(user: ExternalUser) -> Result<(), String> {
        let name = user
            .name
            .as_deref()
            .and_then(|n| valid_name(n).ok())
            .unwrap_or_else(|| user.subject.chars().take(MAX_NAME).collect());
        // An address the provider did not verify could be anyone's: mail to
        // it would go to a stranger, in words the signer-up chose.
        let email = user
            .email
            .filter(|_| user.email_verified)
            .map(|e| e.trim().to_lowercase())
            .filter(|e| valid_email(e));
        let tx = storage::begin().map_err(|e| e.message)?;
        let created = tx
            .execute(
                "INSERT INTO external_users (id, issuer, subject, email, email_verified, name, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
                params![&user.id, &user.issuer, &user.subject, email.as_deref(), user.email_verified, &name, now_millis()],
            )
            .map_err(|e| e.message)?;
        // Welcomed like a registered user, once, when there is an address.
        if let (1, Some(email)) = (created, &email) {
            tx.publish(
                "user.registered",
                Some(&user.id),
                &serde_json::json!({ "user_id": user.id, "email": email, "name": name }),
            )
            .map_err(|e| e.message)?;
        }
        tx.commit().map_err(|e| e.message)
    }
}

agora_sdk::account_provider!(Identity);

const MIN_PASSWORD: usize = 8;
const MAX_NAME: usize = 100;

/// Login attempts per account and window (setting `login_limit`, e.g.
/// `{ attempts = 10, window_seconds = 900 }`, the default). Ten is far more
/// than a forgetful owner needs and caps a guesser at 40 an hour per
/// account. The price of any per-account limit is that a stranger can keep
/// an account's login closed for a window by guessing on purpose; 15
/// minutes keeps that short, and tokens already issued keep working. A
/// successful login clears the count. Attempts are counted in fixed
/// windows in the cache; if the cache is unreachable, login answers 503
/// rather than let guesses through uncounted.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LoginLimit {
    attempts: i64,
    window_seconds: u64,
}

impl Default for LoginLimit {
    fn default() -> Self {
        LoginLimit {
            attempts: 10,
            window_seconds: 900,
        }
    }
}

#[derive(Serialize)]
struct Profile {
    id: String,
    email: String,
    name: String,
    roles: Vec<String>,
}

#[derive(Deserialize)]
struct StoredUser {
    id: String,
    email: String,
    name: String,
    password_hash: String,
}

impl StoredUser {
    fn profile(self) -> Result<Profile> {
        Ok(Profile {
            roles: roles_of(&self.email)?,
            id: self.id,
            email: self.email,
            name: self.name,
        })
    }
}

fn roles_of(email: &str) -> Result<Vec<String>> {
    let admins: Vec<String> = config::get_json("admin_emails")?.unwrap_or_default();
    let mut roles = vec!["customer".to_owned()];
    if admins.iter().any(|a| a.eq_ignore_ascii_case(email)) {
        roles.push("admin".to_owned());
    }
    Ok(roles)
}

/// One user by `id` or `email`.
fn find(column: &str, value: &str) -> Result<Option<StoredUser>> {
    let sql = match column {
        "id" => "SELECT id, email, name, password_hash FROM users WHERE id = $1",
        _ => "SELECT id, email, name, password_hash FROM users WHERE email = $1",
    };
    let rows = storage::query(sql, params![value])?;
    rows.first().map(|r| r.decode()).transpose()
}

/// Where a user's record is.
#[derive(PartialEq)]
enum Kind {
    Local,
    /// Signed in at a trusted provider.
    External,
}

/// The user with this id, local or external. An external user without an
/// email has an empty one.
fn find_any(id: &str) -> Result<Option<(StoredUser, Kind)>> {
    if let Some(user) = find("id", id)? {
        return Ok(Some((user, Kind::Local)));
    }
    let rows = storage::query(
        "SELECT id, COALESCE(email, '') AS email, name, '' AS password_hash \
         FROM external_users WHERE id = $1",
        params![id],
    )?;
    rows.first()
        .map(|r| Ok((r.decode()?, Kind::External)))
        .transpose()
}

fn validation(code: &str, message: &str) -> Error {
    Error::new(400, code, message)
}

fn valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && email.len() <= 254
        && !email.chars().any(char::is_whitespace)
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
}

fn valid_name(name: &str) -> Result<String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME {
        return Err(validation(
            "invalid_name",
            "the name must have 1 to 100 characters",
        ));
    }
    Ok(name.to_owned())
}

fn hash_password(password: &str) -> Result<String> {
    let salt_bytes = wasip2::random::random::get_random_bytes(16);
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| Error::internal(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::internal(format!("hashing: {e}")))
}

fn password_matches(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Registration {
    email: String,
    password: String,
    name: String,
}

fn register(req: &Request) -> Result<Response> {
    let body: Registration = req.json()?;
    let email = body.email.trim().to_lowercase();
    if !valid_email(&email) {
        return Err(validation(
            "invalid_email",
            "the email address is not valid",
        ));
    }
    if body.password.chars().count() < MIN_PASSWORD {
        return Err(validation(
            "weak_password",
            "the password must have at least 8 characters",
        ));
    }
    let name = valid_name(&body.name)?;
    let hash = hash_password(&body.password)?;
    let id = new_id();
    let tx = storage::begin()?;
    tx.execute(
        "INSERT INTO users (id, email, name, password_hash, created_at) VALUES ($1, $2, $3, $4, $5)",
        params![&id, &email, &name, hash, now_millis()],
    )
    .map_err(|e| match e.status {
        409 => Error::new(409, "email_taken", "a user with this email already exists"),
        _ => e,
    })?;
    tx.publish(
        "user.registered",
        Some(&id),
        &serde_json::json!({ "user_id": id, "email": email, "name": name }),
    )?;
    tx.commit()?;
    let profile = Profile {
        roles: roles_of(&email)?,
        id,
        email,
        name,
    };
    Ok(Response::created(&profile))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    email: String,
    password: String,
}

/// What counting a login attempt on an account decided.
enum Attempt {
    /// Go ahead; the key of the account's counter, cleared on success.
    Counted(String),
    /// The account has had its attempts for this window: the 429 to send.
    Refused(Response),
}

/// Counts an attempt on the account `email`.
fn count_attempt(email: &str) -> Result<Attempt> {
    let limit: LoginLimit = config::get_json("login_limit")?.unwrap_or_default();
    if limit.attempts <= 0 || limit.window_seconds == 0 {
        return Err(Error::internal(
            "setting `login_limit` needs `attempts` and `window_seconds` above 0",
        ));
    }
    let now = now_millis() as u64 / 1000;
    let window = now / limit.window_seconds;
    let key = format!("login-attempts:{window}:{email}");
    let ttl = std::time::Duration::from_secs(limit.window_seconds);
    if cache::increment(&key, 1, Some(ttl))? <= limit.attempts {
        return Ok(Attempt::Counted(key));
    }
    let retry_after = (window + 1) * limit.window_seconds - now;
    let refusal = Error::new(
        429,
        "rate_limited",
        format!("too many login attempts for this account; retry in {retry_after} s"),
    );
    Ok(Attempt::Refused(
        refusal
            .into_response()
            .with_header("retry-after", &retry_after.to_string()),
    ))
}

fn invalid_credentials() -> Error {
    Error::new(401, "invalid_credentials", "wrong email or password")
}

fn login(req: &Request) -> Result<Response> {
    let body: Login = req.json()?;
    let email = body.email.trim().to_lowercase();
    if !valid_email(&email) {
        // No account has such an address, and anyone can tell it is malformed.
        return Err(invalid_credentials());
    }
    let counter = match count_attempt(&email)? {
        Attempt::Counted(counter) => counter,
        Attempt::Refused(refusal) => return Ok(refusal),
    };
    let user = find("email", &email)?;
    let verified = match &user {
        Some(user) => password_matches(&body.password, &user.password_hash),
        None => {
            // Spend the time a real check takes, so timing does not tell
            // which emails have accounts.
            let _ = hash_password(&body.password);
            false
        }
    };
    let Some(user) = user.filter(|_| verified) else {
        return Err(invalid_credentials());
    };
    cache::delete(&counter)?;
    let issued = tokens::issue(&user.id, &roles_of(&user.email)?, None)?;
    Ok(Response::ok(&serde_json::json!({
        "token": issued.token,
        "token_type": "Bearer",
        "expires_in": issued.expires_in,
    })))
}

fn me(req: &Request) -> Result<Response> {
    let user = req.require_user()?;
    let (stored, kind) =
        find_any(&user.id)?.ok_or_else(|| Error::not_found("the user no longer exists"))?;
    if kind == Kind::External {
        // A provider's email says nothing about roles here: the gateway's
        // mapping of its token does.
        return Ok(Response::ok(&Profile {
            id: stored.id,
            email: stored.email,
            name: stored.name,
            roles: user.roles.clone(),
        }));
    }
    Ok(Response::ok(&stored.profile()?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileUpdate {
    name: Option<String>,
}

fn update_me(req: &Request) -> Result<Response> {
    let user = req.require_user()?;
    let body: ProfileUpdate = req.json()?;
    if let Some(name) = body.name {
        let name = valid_name(&name)?;
        let tx = storage::begin()?;
        for table in ["users", "external_users"] {
            tx.execute(
                &format!("UPDATE {table} SET name = $1 WHERE id = $2"),
                params![&name, &user.id],
            )?;
        }
        // The whole contact, as `user.registered` has it: a subscriber
        // that saw neither event yet keeps the newer whole.
        let found = tx.query(
            "SELECT email FROM users WHERE id = $1
             UNION ALL SELECT COALESCE(email, '') FROM external_users WHERE id = $1",
            params![&user.id],
        )?;
        if let Some(row) = found.first() {
            let email: String = row.get("email")?;
            tx.publish(
                "user.updated",
                Some(&user.id),
                &serde_json::json!({ "user_id": user.id, "email": email, "name": name }),
            )?;
        }
        tx.commit()?;
    }
    me(req)
}
