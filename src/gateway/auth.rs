//! JWT verification as Supabase Realtime does it (`JwtVerification`):
//! HS256/384/512 with the project's secret; RS256/384/512, ES256/384 and
//! EdDSA with the key of the configured JWKS whose `kid` the token names
//! (an HS* token naming an `oct` key of the JWKS uses that key, else the
//! secret). `exp` and `role` are required and `exp` is checked; claim
//! validators (`jwt_claim_validators`) must match exactly. Errors carry
//! Supabase's codes and messages, which clients match on.

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use serde_json::{Map, Value};

/// A token that verified: its claims and the role they name.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// Every claim of the token (shared by the subscriptions it authorizes).
    pub claims: std::sync::Arc<Map<String, Value>>,
    /// The `role` claim: the database role subscriptions run as.
    pub role: String,
    /// The `exp` claim, seconds since the Unix epoch.
    pub exp: i64,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token at all.
    #[error("API key is missing")]
    Missing,
    /// `exp` is in the past.
    #[error("Token has expired {0} seconds ago")]
    Expired(i64),
    /// `role` or `exp` is absent.
    #[error("Fields `role` and `exp` are required in JWT")]
    MissingFields,
    /// The token is longer than `max_jwt_bytes`: refused before it is
    /// decoded, as its claims would be stored with every subscription.
    #[error("Token is {bytes} bytes; at most {max} are accepted")]
    TooLarge {
        /// The token's length.
        bytes: usize,
        /// `max_jwt_bytes`.
        max: usize,
    },
    /// `nbf` (not before) or `iat` (issued at) is later than now, beyond
    /// the allowed clock skew, or not a number.
    #[error("{}", not_yet_message(.claim, *.seconds))]
    NotYetValid {
        /// `nbf` or `iat`.
        claim: &'static str,
        /// How far ahead of now it is; `None`: not a number.
        seconds: Option<i64>,
    },
    /// Not a JWT at all.
    #[error("The token provided is not a valid JWT")]
    Malformed,
    /// The signature does not match the key.
    #[error("Failed to validate JWT signature")]
    Signature,
    /// No key to verify with: the token's `kid` is not in the JWKS (with
    /// a matching `kty`), an RS/ES/EdDSA token names no `kid`, its
    /// algorithm is not one Supabase verifies, or an HS* token arrives
    /// while no secret is configured.
    #[error("{}", signer_message(.0.as_deref()))]
    Signer(Option<String>),
    /// A claim of `jwt_claim_validators` is absent or has another value.
    #[error("claim `{claim}` is {found}, not the required {expected} (jwt_claim_validators)")]
    Claim {
        /// The claim's name.
        claim: String,
        /// What the token has, rendered as Elixir prints it (`nil` when
        /// absent), clipped to [`super::quiet::CLIP_BYTES`].
        found: String,
        /// What the validator requires, rendered the same way.
        expected: String,
    },
}

fn not_yet_message(claim: &str, seconds: Option<i64>) -> String {
    match (claim, seconds) {
        (_, None) => format!("Token claim `{claim}` must be a number"),
        ("nbf", Some(s)) => format!("Token is not valid yet: its nbf is {s} seconds from now"),
        (_, Some(s)) => {
            format!("Token is issued in the future: its {claim} is {s} seconds from now")
        }
    }
}

fn signer_message(kid: Option<&str>) -> String {
    match kid {
        Some(kid) => format!(
            "Failed to generate JWT signer for key ID (kid) {}, check your JWT secret or JWKS configuration",
            Value::from(kid)
        ),
        None => {
            "Failed to generate JWT signer, check your JWT secret or JWKS configuration".to_owned()
        }
    }
}

impl AuthError {
    /// Supabase's error code, the prefix of a join error's `reason`.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "Unauthorized",
            AuthError::Expired(_) => "InvalidJWTExpiration",
            AuthError::MissingFields
            | AuthError::TooLarge { .. }
            | AuthError::NotYetValid { .. } => "InvalidJWTToken",
            AuthError::Malformed => "MalformedJWT",
            AuthError::Signature => "JwtSignatureError",
            AuthError::Signer(_) => "JwtSignerError",
            // Supabase does not handle Joken's claim error: it falls
            // through to its catch-all.
            AuthError::Claim { .. } => "UnknownErrorOnChannel",
        }
    }

    /// The join error `reason`: `<Code>: <message>`, except for a claim
    /// that does not match, which Supabase answers with its bare
    /// `Unknown Error on Channel`.
    pub fn reason(&self) -> String {
        match self {
            AuthError::Claim { .. } => "Unknown Error on Channel".to_owned(),
            _ => format!("{}: {self}", self.code()),
        }
    }

    /// The message of the `system` error that closes a channel whose new
    /// token was refused. For a claim that does not match, Supabase sends
    /// Joken's error as Elixir prints it.
    pub fn system_message(&self) -> String {
        match self {
            AuthError::Claim { claim, found, .. } => format!(
                "[message: \"Invalid token\", claim: {}, claim_val: {found}]",
                Value::from(claim.as_str())
            ),
            _ => self.to_string(),
        }
    }

    /// How a connection with this token is refused: HTTP status and the
    /// `error` text of the JSON body.
    pub fn http_refusal(&self) -> (u16, String) {
        match self {
            AuthError::Missing | AuthError::Expired(_) | AuthError::Signer(_) => {
                (401, self.to_string())
            }
            // Supabase's fallback for errors it does not map.
            AuthError::Claim { .. } => (500, "Error connecting to Realtime".to_owned()),
            _ => (403, self.to_string()),
        }
    }
}

/// A JWKS key's family (`kty`): which algorithms it verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Family {
    /// `RSA`: RS256, RS384, RS512.
    Rsa,
    /// `EC`: ES256 (P-256), ES384 (P-384).
    Ec,
    /// `OKP`: EdDSA (Ed25519).
    Okp,
    /// `oct`: HS256, HS384, HS512.
    Oct,
}

#[derive(Clone)]
struct SetKey {
    kid: String,
    family: Family,
    key: DecodingKey,
}

/// The keys tokens may be signed with, found by the `kid` of a token's
/// header: a JWKS document (`jwt_jwks`).
#[derive(Clone, Default)]
pub struct KeySet {
    keys: Vec<SetKey>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // kids only: `oct` keys are secrets.
        f.debug_list()
            .entries(self.keys.iter().map(|k| &k.kid))
            .finish()
    }
}

impl KeySet {
    /// Reads a JWKS document, `{"keys": [...]}`. Every key needs a `kid`
    /// (tokens are matched to keys by it) and must be a public key walcast
    /// can verify with: RSA, EC on P-256 or P-384, OKP on Ed25519, or oct.
    pub fn parse(text: &str) -> Result<KeySet, String> {
        let document: Value = serde_json::from_str(text)
            .map_err(|e| format!("not a JSON JWKS document ({e}); expected {{\"keys\": [...]}}"))?;
        let Some(keys) = document.get("keys").and_then(Value::as_array) else {
            return Err("expected a JWKS document {\"keys\": [...]}".to_owned());
        };
        let mut seen = HashSet::new();
        let mut set = KeySet::default();
        for (i, raw) in keys.iter().enumerate() {
            let key = set_key(i, raw)?;
            if !seen.insert((key.family, key.kid.clone())) {
                return Err(format!(
                    "key {i}: kid {} appears twice for the same kty",
                    Value::from(key.kid.as_str())
                ));
            }
            set.keys.push(key);
        }
        Ok(set)
    }

    /// How many keys the set holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn find(&self, family: Family, kid: &str) -> Option<&DecodingKey> {
        self.keys
            .iter()
            .find(|k| k.family == family && k.kid == kid)
            .map(|k| &k.key)
    }
}

fn set_key(i: usize, raw: &Value) -> Result<SetKey, String> {
    let Some(object) = raw.as_object() else {
        return Err(format!("key {i} is not a JSON object"));
    };
    let kid = match object.get("kid") {
        Some(Value::String(kid)) if !kid.is_empty() => kid.clone(),
        _ => {
            return Err(format!(
                "key {i} has no \"kid\": tokens are matched to keys by the kid in their header"
            ));
        }
    };
    let named = format!("key {i} (kid {})", Value::from(kid.as_str()));
    if object.contains_key("d") {
        return Err(format!(
            "{named} holds private key material (\"d\"): give only the public key"
        ));
    }
    let jwk: Jwk = serde_json::from_value(raw.clone())
        .map_err(|e| format!("{named} is not a valid JWK: {e}"))?;
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Family::Rsa,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 | EllipticCurve::P384 => Family::Ec,
            _ => {
                return Err(format!(
                    "{named}: curve {:?} is not supported; use P-256 (ES256) or P-384 (ES384)",
                    p.curve
                ));
            }
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => Family::Okp,
            _ => {
                return Err(format!(
                    "{named}: curve {:?} is not supported; use Ed25519",
                    p.curve
                ));
            }
        },
        AlgorithmParameters::OctetKey(_) => Family::Oct,
        _ => {
            return Err(format!(
                "{named}: unsupported kty; expected RSA, EC, OKP or oct"
            ));
        }
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("{named} cannot be used: {e}"))?;
    Ok(SetKey { kid, family, key })
}

/// Claims a token must carry with exactly these values
/// (`jwt_claim_validators`, Supabase's `JWT_CLAIM_VALIDATORS`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClaimValidators(Vec<(String, Value)>);

impl ClaimValidators {
    /// Reads a JSON object of claim names and the values they must have,
    /// e.g. `{"iss":"supabase","aud":"authenticated"}`.
    pub fn parse(text: &str) -> Result<ClaimValidators, String> {
        let parsed: Value = serde_json::from_str(text).map_err(|e| {
            format!(
                "expected a JSON object of claims and the values they must have, e.g. {{\"iss\":\"supabase\",\"aud\":\"authenticated\"}} (in TOML, as a quoted string): {e}"
            )
        })?;
        let Value::Object(object) = parsed else {
            return Err(
                "expected a JSON object of claims and the values they must have, e.g. {\"iss\":\"supabase\",\"aud\":\"authenticated\"}"
                    .to_owned(),
            );
        };
        let mut validators = Vec::with_capacity(object.len());
        for (claim, value) in object {
            if claim.is_empty() {
                return Err("a claim name must not be empty".to_owned());
            }
            if claim == "exp" {
                return Err(
                    "`exp` cannot be matched exactly: it is always checked against the clock"
                        .to_owned(),
                );
            }
            validators.push((claim, value));
        }
        Ok(ClaimValidators(validators))
    }

    /// Whether there is nothing to check.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The claims checked, in order.
    pub fn claims(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(claim, _)| claim.as_str())
    }

    /// Every validator must hold; an absent claim does not.
    fn check(&self, claims: &Map<String, Value>) -> Result<(), AuthError> {
        for (claim, expected) in &self.0 {
            let found = claims.get(claim);
            if !found.is_some_and(|found| same(found, expected)) {
                return Err(AuthError::Claim {
                    claim: claim.clone(),
                    // The token's value, clipped: it is logged.
                    found: found.map_or_else(
                        || "nil".to_owned(),
                        |v| super::quiet::clip(&elixir(v)).into_owned(),
                    ),
                    expected: elixir(expected),
                });
            }
        }
        Ok(())
    }
}

/// Equality as Elixir's `==` decides it on decoded JSON: numbers by value
/// (`1 == 1.0`), everything else structurally.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => match (x.as_u64(), y.as_u64()) {
                (Some(x), Some(y)) => x == y,
                _ => x.as_f64() == y.as_f64(),
            },
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

/// A decoded JSON value as Elixir's `inspect` prints it: Supabase's
/// messages embed claims that way.
fn elixir(value: &Value) -> String {
    match value {
        Value::Null => "nil".to_owned(),
        Value::Bool(_) | Value::Number(_) | Value::String(_) => value.to_string(),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(elixir).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(entries) => {
            let entries: Vec<String> = entries
                .iter()
                .map(|(k, v)| format!("{} => {}", Value::from(k.as_str()), elixir(v)))
                .collect();
            format!("%{{{}}}", entries.join(", "))
        }
    }
}

/// Seconds a token's `nbf` or `iat` may lie ahead of this clock (the
/// issuer's clock may run ahead a little): jsonwebtoken's default leeway.
pub const CLOCK_SKEW_SECS: i64 = 60;

/// Verifies tokens: HS* with the secret (or an `oct` key of the JWKS
/// named by `kid`), RS*/ES*/EdDSA with the JWKS key named by `kid`.
pub struct Verifier {
    secret: Option<DecodingKey>,
    keys: KeySet,
    validators: ClaimValidators,
    max_bytes: usize,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("keys", &self.keys)
            .field("validators", &self.validators)
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

impl Verifier {
    /// A verifier for HS* tokens signed with `secret`, without JWKS or
    /// claim validators.
    pub fn new(secret: &[u8]) -> Verifier {
        Verifier::with_keys(Some(secret), KeySet::default(), ClaimValidators::default())
    }

    /// A verifier with an optional HMAC secret, a JWKS and claim validators.
    pub fn with_keys(secret: Option<&[u8]>, keys: KeySet, validators: ClaimValidators) -> Verifier {
        Verifier {
            secret: secret.map(DecodingKey::from_secret),
            keys,
            validators,
            max_bytes: super::limits::Limits::default().max_jwt_bytes,
        }
    }

    /// Refuses tokens longer than `max_bytes` (`max_jwt_bytes`).
    pub fn max_bytes(mut self, max_bytes: usize) -> Verifier {
        self.max_bytes = max_bytes;
        self
    }

    /// Verifies `token` now.
    pub fn verify(&self, token: &str) -> Result<Verified, AuthError> {
        self.verify_at(token, unix_now())
    }

    /// Verifies `token` as of `now` (seconds since the Unix epoch).
    pub fn verify_at(&self, token: &str, now: i64) -> Result<Verified, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > self.max_bytes {
            return Err(AuthError::TooLarge {
                bytes: token.len(),
                max: self.max_bytes,
            });
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let key = self.key_for(&header)?;
        let mut validation = Validation::new(header.alg);
        // `exp` is checked below, to say how long ago it expired; `aud`
        // only when a claim validator asks for it, as Supabase does.
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_aud = false;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature
                | jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => AuthError::Signature,
                _ => AuthError::Malformed,
            },
        )?;
        let claims = data.claims;
        let exp = claims.get("exp").and_then(|e| {
            e.as_i64()
                .or_else(|| e.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
        });
        if let Some(exp) = exp
            && exp <= now
        {
            return Err(AuthError::Expired(now.saturating_sub(exp)));
        }
        for claim in ["nbf", "iat"] {
            let Some(value) = claims.get(claim) else {
                continue;
            };
            let Some(at) = value
                .as_i64()
                .or_else(|| value.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            else {
                return Err(AuthError::NotYetValid {
                    claim,
                    seconds: None,
                });
            };
            if at > now.saturating_add(CLOCK_SKEW_SECS) {
                return Err(AuthError::NotYetValid {
                    claim,
                    seconds: Some(at.saturating_sub(now)),
                });
            }
        }
        self.validators.check(&claims)?;
        let role = claims.get("role").and_then(Value::as_str);
        let (Some(role), Some(exp)) = (role, exp) else {
            return Err(AuthError::MissingFields);
        };
        Ok(Verified {
            role: role.to_owned(),
            exp,
            claims: std::sync::Arc::new(claims),
        })
    }

    /// The key `header` asks for, chosen as Supabase chooses its signer.
    fn key_for(&self, header: &Header) -> Result<&DecodingKey, AuthError> {
        let kid = header.kid.as_deref();
        let family = match header.alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                // Supabase Auth's HS256 tokens carry a kid but the JWKS has
                // no `oct` key for it: the secret verifies them.
                if let Some(key) = kid.and_then(|kid| self.keys.find(Family::Oct, kid)) {
                    return Ok(key);
                }
                return self.secret.as_ref().ok_or_else(|| {
                    AuthError::Signer(kid.map(|kid| super::quiet::clip(kid).into_owned()))
                });
            }
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => Family::Rsa,
            Algorithm::ES256 | Algorithm::ES384 => Family::Ec,
            Algorithm::EdDSA => Family::Okp,
            // PS256/384/512: Supabase has no signer for them.
            _ => return Err(AuthError::Signer(None)),
        };
        let Some(kid) = kid else {
            return Err(AuthError::Signer(None));
        };
        self.keys
            .find(family, kid)
            .ok_or_else(|| AuthError::Signer(Some(super::quiet::clip(kid).into_owned())))
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    fn sign(alg: Algorithm, secret: &[u8], claims: Value) -> String {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn sign_kid(alg: Algorithm, kid: &str, key: &EncodingKey, claims: Value) -> String {
        let mut header = Header::new(alg);
        header.kid = Some(kid.to_owned());
        encode(&header, &claims, key).unwrap()
    }

    #[test]
    fn hs256_384_512_tokens_verify() {
        let v = Verifier::new(b"secret");
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let t = sign(
                alg,
                b"secret",
                json!({"role": "anon", "exp": 2000, "sub": "u"}),
            );
            let ok = v.verify_at(&t, 1000).unwrap();
            assert_eq!((ok.role.as_str(), ok.exp), ("anon", 2000));
            assert_eq!(ok.claims["sub"], "u");
        }
    }

    #[test]
    fn refusals_carry_supabases_codes() {
        let v = Verifier::new(b"secret");
        let expired = sign(
            Algorithm::HS256,
            b"secret",
            json!({"role": "anon", "exp": 700}),
        );
        assert_eq!(
            v.verify_at(&expired, 1000).unwrap_err().reason(),
            "InvalidJWTExpiration: Token has expired 300 seconds ago"
        );
        let no_role = sign(Algorithm::HS256, b"secret", json!({"exp": 2000}));
        assert_eq!(
            v.verify_at(&no_role, 1000).unwrap_err().reason(),
            "InvalidJWTToken: Fields `role` and `exp` are required in JWT"
        );
        let other = sign(
            Algorithm::HS256,
            b"other",
            json!({"role": "anon", "exp": 2000}),
        );
        assert_eq!(v.verify_at(&other, 1000), Err(AuthError::Signature));
        assert_eq!(v.verify_at("not.a.jwt", 1000), Err(AuthError::Malformed));
        assert_eq!(v.verify_at("", 1000), Err(AuthError::Missing));
    }

    #[test]
    fn a_token_from_the_future_or_too_large_is_refused() {
        let v = Verifier::new(b"secret");
        let at = |claims: Value| v.verify_at(&sign(Algorithm::HS256, b"secret", claims), 1000);
        assert!(at(json!({"role": "anon", "exp": 2000, "nbf": 1060, "iat": 1060})).is_ok());
        assert_eq!(
            at(json!({"role": "anon", "exp": 2000, "nbf": 1061}))
                .unwrap_err()
                .reason(),
            "InvalidJWTToken: Token is not valid yet: its nbf is 61 seconds from now"
        );
        assert_eq!(
            at(json!({"role": "anon", "exp": 2000, "iat": 4600.4}))
                .unwrap_err()
                .reason(),
            "InvalidJWTToken: Token is issued in the future: its iat is 3600 seconds from now"
        );
        assert_eq!(
            at(json!({"role": "anon", "exp": 2000, "iat": "soon"}))
                .unwrap_err()
                .reason(),
            "InvalidJWTToken: Token claim `iat` must be a number"
        );
        assert_eq!(
            at(json!({"role": "anon", "exp": i64::MIN})).unwrap_err(),
            AuthError::Expired(i64::MAX),
            "no overflow"
        );
        let big = sign(
            Algorithm::HS256,
            b"secret",
            json!({"role": "anon", "exp": 2000, "pad": "x".repeat(200)}),
        );
        let small = Verifier::new(b"secret").max_bytes(100);
        assert_eq!(
            small.verify_at(&big, 1000).unwrap_err().reason(),
            format!(
                "InvalidJWTToken: Token is {} bytes; at most 100 are accepted",
                big.len()
            )
        );
        assert_eq!(
            small.verify_at(&big, 1000).unwrap_err().http_refusal().0,
            403
        );
    }

    #[test]
    fn claim_validators_match_exactly_and_an_absent_claim_fails() {
        let validators =
            ClaimValidators::parse(r#"{"iss":"supabase","aud":"authenticated","n":1}"#).unwrap();
        let v = Verifier::with_keys(Some(b"s"), KeySet::default(), validators);
        let good = json!({"role": "anon", "exp": 2000, "iss": "supabase", "aud": "authenticated", "n": 1.0});
        assert!(
            v.verify_at(&sign(Algorithm::HS256, b"s", good), 1000)
                .is_ok()
        );
        let wrong =
            json!({"role": "anon", "exp": 2000, "iss": "evil", "aud": "authenticated", "n": 1});
        let e = v
            .verify_at(&sign(Algorithm::HS256, b"s", wrong), 1000)
            .unwrap_err();
        assert_eq!(e.reason(), "Unknown Error on Channel");
        assert_eq!(
            e.system_message(),
            r#"[message: "Invalid token", claim: "iss", claim_val: "evil"]"#
        );
        assert_eq!(
            e.http_refusal(),
            (500, "Error connecting to Realtime".to_owned())
        );
        assert_eq!(
            e.to_string(),
            r#"claim `iss` is "evil", not the required "supabase" (jwt_claim_validators)"#
        );
        let absent = json!({"role": "anon", "exp": 2000, "iss": "supabase", "n": 1});
        let e = v
            .verify_at(&sign(Algorithm::HS256, b"s", absent), 1000)
            .unwrap_err();
        assert_eq!(
            e.system_message(),
            r#"[message: "Invalid token", claim: "aud", claim_val: nil]"#
        );
        assert_eq!(
            elixir(&json!({"a": [1, null, true]})),
            r#"%{"a" => [1, nil, true]}"#
        );
    }

    #[test]
    fn claim_validators_must_be_a_json_object_without_exp() {
        assert!(ClaimValidators::parse("{}").unwrap().is_empty());
        for bad in [
            "[1]",
            "iss=supabase",
            "{ iss = \"x\" }",
            r#"{"exp":1}"#,
            r#"{"":1}"#,
        ] {
            assert!(ClaimValidators::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_are_chosen_by_kid_and_family_as_supabase_chooses_signers() {
        let oct = r#"{"keys":[{"kty":"oct","kid":"h1","k":"b2N0LXNlY3JldA"}]}"#;
        let keys = KeySet::parse(oct).unwrap();
        assert_eq!(keys.len(), 1);
        let claims = json!({"role": "anon", "exp": 2000});
        // An HS token naming the oct key uses it; one naming another kid,
        // or none, uses the secret; without a secret there is no signer.
        let v = Verifier::with_keys(Some(b"s"), keys.clone(), ClaimValidators::default());
        let oct_key = EncodingKey::from_secret(b"oct-secret");
        assert!(
            v.verify_at(
                &sign_kid(Algorithm::HS256, "h1", &oct_key, claims.clone()),
                1000
            )
            .is_ok()
        );
        let secret_key = EncodingKey::from_secret(b"s");
        assert!(
            v.verify_at(
                &sign_kid(Algorithm::HS256, "other", &secret_key, claims.clone()),
                1000
            )
            .is_ok()
        );
        let no_secret = Verifier::with_keys(None, keys, ClaimValidators::default());
        assert_eq!(
            no_secret
                .verify_at(
                    &sign_kid(Algorithm::HS256, "other", &secret_key, claims.clone()),
                    1000
                )
                .unwrap_err()
                .reason(),
            r#"JwtSignerError: Failed to generate JWT signer for key ID (kid) "other", check your JWT secret or JWKS configuration"#
        );
        assert_eq!(
            no_secret
                .verify_at(&sign(Algorithm::HS256, b"s", claims), 1000)
                .unwrap_err(),
            AuthError::Signer(None)
        );
    }

    #[test]
    fn bad_jwks_documents_are_refused_with_what_is_wrong() {
        for (doc, says) in [
            ("nope", "not a JSON JWKS document"),
            (r#"{"k":[]}"#, "expected a JWKS document"),
            (
                r#"{"keys":[{"kty":"oct","k":"YQ"}]}"#,
                "key 0 has no \"kid\"",
            ),
            (
                r#"{"keys":[{"kty":"RSA","kid":"r","n":"AQAB","e":"AQAB","d":"AQAB"}]}"#,
                "private key material",
            ),
            (r#"{"keys":[{"kty":"XYZ","kid":"x"}]}"#, "key 0 (kid \"x\")"),
            (
                r#"{"keys":[{"kty":"oct","kid":"a","k":"YQ"},{"kty":"oct","kid":"a","k":"Yg"}]}"#,
                "appears twice",
            ),
        ] {
            let e = KeySet::parse(doc).unwrap_err();
            assert!(e.contains(says), "{doc}: {e}");
        }
    }
}
