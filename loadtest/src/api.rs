//! The REST API calls a run needs to set itself up: its own application
//! (registered through the two-step flow, reading the activation code from
//! the server's mail outbox, or given credentials), users (as the
//! application server creates them: by signing user tokens), conversations,
//! and clean-up.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use base64::Engine;
use serde_json::{Value, json};

/// How the run gets its application.
#[derive(Clone, Debug)]
pub enum Credentials {
    /// Use an application that exists.
    Given { application_id: String, application_key: String },
    /// Register a new one; the activation code is read from this outbox
    /// directory of the server (same machine).
    Register { email: String, outbox: PathBuf },
}

/// The run's application on one server. Its key never appears in Debug output.
#[derive(Clone)]
pub struct Api {
    pub base_url: String,
    pub application_id: String,
    pub application_key: String,
    http: reqwest::Client,
}

fn ok(status: reqwest::StatusCode, body: Value, what: &str) -> anyhow::Result<Value> {
    if !status.is_success() {
        bail!("{what} answered {status}: {body}");
    }
    Ok(body)
}

/// The newest `.eml` in `outbox` addressed to `email`, and the first
/// eight-digit code in it.
fn activation_code(outbox: &std::path::Path, email: &str) -> anyhow::Result<String> {
    let mut newest: Option<(SystemTime, String)> = None;
    for entry in std::fs::read_dir(outbox).with_context(|| format!("cannot read the outbox {}", outbox.display()))? {
        let entry = entry?;
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if !text.contains(email) {
            continue;
        }
        let modified = entry.metadata()?.modified()?;
        if newest.as_ref().is_none_or(|(time, _)| modified > *time) {
            newest = Some((modified, text));
        }
    }
    let (_, text) = newest.with_context(|| format!("no mail to {email} in {}", outbox.display()))?;
    text.split(|c: char| !c.is_ascii_digit())
        .find(|word| word.len() == 8)
        .map(str::to_owned)
        .with_context(|| format!("no activation code in the mail to {email}"))
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").field("base_url", &self.base_url).field("application_id", &self.application_id).finish()
    }
}

impl Api {
    pub async fn connect(base_url: &str, credentials: &Credentials) -> anyhow::Result<Api> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        let base_url = base_url.trim_end_matches('/').to_owned();
        let (application_id, application_key) = match credentials {
            Credentials::Given { application_id, application_key } => (application_id.clone(), application_key.clone()),
            Credentials::Register { email, outbox } => {
                let name = format!("loadtest-{}", SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis());
                let request = json!({"email": email, "applicationName": name, "applicationUserCount": 100});
                let answer = http.post(format!("{base_url}/api/v1/registration/request")).json(&request).send().await?;
                let status = answer.status();
                ok(status, answer.json().await.unwrap_or_default(), "RequestRegistration")?;
                let code = activation_code(outbox, email)?;
                let mut complete = request;
                complete["activationCode"] = json!(code);
                let answer =
                    http.post(format!("{base_url}/api/v1/registration/complete")).json(&complete).send().await?;
                let status = answer.status();
                let data = ok(status, answer.json().await.unwrap_or_default(), "CompleteRegistration")?;
                (
                    data["applicationId"].as_str().context("no applicationId")?.to_owned(),
                    data["applicationKey"].as_str().context("no applicationKey")?.to_owned(),
                )
            }
        };
        Ok(Api { base_url, application_id, application_key, http })
    }

    fn authorization(&self) -> String {
        let credentials = format!("{}:{}", self.application_id, self.application_key);
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(credentials))
    }

    /// A privileged call (optionally acting as a user).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        act_as: Option<&str>,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut request =
            self.http.request(method, format!("{}{path}", self.base_url)).header("authorization", self.authorization());
        if let Some(user) = act_as {
            request = request.header("x-beseda-act-as-user", user);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer = request.send().await?;
        let status = answer.status();
        ok(status, answer.json().await.unwrap_or_default(), path)
    }

    /// A user token, signed as the application server signs them.
    pub fn token(&self, infobase_id: &str, name: &str) -> anyhow::Result<String> {
        let now = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs())?;
        let claims = json!({
            "iss": self.application_id, "aud": "beseda", "sub": infobase_id, "name": name,
            "iat": now, "exp": now + 23 * 3600,
        });
        Ok(jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(self.application_key.as_bytes()),
        )?)
    }

    /// Creates (or finds) the user by authenticating with its token once;
    /// returns its id and token.
    pub async fn user(&self, infobase_id: &str, name: &str) -> anyhow::Result<(String, String)> {
        let token = self.token(infobase_id, name)?;
        let answer = self.http.get(format!("{}/api/v1/application", self.base_url)).bearer_auth(&token).send().await?;
        let status = answer.status();
        ok(status, answer.json().await.unwrap_or_default(), "GetApplicationInfo")?;
        let found = self
            .call(reqwest::Method::POST, "/api/v1/users/search", None, Some(json!({"infobaseUserId": infobase_id})))
            .await?;
        let id = found["users"][0]["id"].as_str().with_context(|| format!("user {name} was not created"))?.to_owned();
        Ok((id, token))
    }

    pub async fn group(&self, title: &str, member_ids: &[String]) -> anyhow::Result<String> {
        let created = self
            .call(
                reqwest::Method::POST,
                "/api/v1/conversations",
                None,
                Some(json!({"conversation": {"title": title, "group": true, "memberIds": member_ids}})),
            )
            .await?;
        Ok(created["id"].as_str().context("no conversation id")?.to_owned())
    }

    pub async fn one_on_one(&self, a: &str, b: &str) -> anyhow::Result<String> {
        let created = self
            .call(
                reqwest::Method::POST,
                "/api/v1/conversations",
                None,
                Some(json!({"conversation": {"group": false, "memberIds": [a, b]}})),
            )
            .await?;
        Ok(created["id"].as_str().context("no conversation id")?.to_owned())
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }
}
