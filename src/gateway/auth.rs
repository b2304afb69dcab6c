//! JWT verification: HS256, HS384 or HS512 with the tenant's secret;
//! `exp` and `role` required, `exp` checked. Errors carry Supabase's codes
//! and messages, which clients match on.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

/// A token that verified: its claims and the role they name.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// Every claim of the token.
    pub claims: Map<String, Value>,
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
    /// Not a JWT at all.
    #[error("The token provided is not a valid JWT")]
    Malformed,
    /// The signature does not match the secret (or the algorithm is not HS*).
    #[error("Failed to validate JWT signature")]
    Signature,
}

impl AuthError {
    /// Supabase's error code, the prefix of a join error's `reason`.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "Unauthorized",
            AuthError::Expired(_) => "InvalidJWTExpiration",
            AuthError::MissingFields => "InvalidJWTToken",
            AuthError::Malformed => "MalformedJWT",
            AuthError::Signature => "JwtSignatureError",
        }
    }

    /// The join error `reason`: `<Code>: <message>`.
    pub fn reason(&self) -> String {
        format!("{}: {self}", self.code())
    }
}

/// Verifies tokens against one HMAC secret.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier { .. }")
    }
}

impl Verifier {
    /// A verifier for tokens signed with `secret`.
    pub fn new(secret: &[u8]) -> Verifier {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
        // `exp` is checked below, to say how long ago it expired; `aud`
        // is not configured, so any (Supabase's `authenticated`) is accepted.
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_aud = false;
        Verifier {
            key: DecodingKey::from_secret(secret),
            validation,
        }
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
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature
            | jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => AuthError::Signature,
            _ => AuthError::Malformed,
        })?;
        let claims = data.claims;
        let role = claims.get("role").and_then(Value::as_str);
        let exp = claims.get("exp").and_then(|e| {
            e.as_i64()
                .or_else(|| e.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
        });
        let (Some(role), Some(exp)) = (role, exp) else {
            return Err(AuthError::MissingFields);
        };
        if exp <= now {
            return Err(AuthError::Expired(now - exp));
        }
        Ok(Verified {
            role: role.to_owned(),
            exp,
            claims,
        })
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
}
