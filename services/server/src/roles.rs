//! Which services one process runs. The all-in-one default runs the
//! gateway, routing and bots together on the embedded store; a cluster runs
//! them as separate processes (docs/deploy.md) talking gRPC, with the
//! registry voters as processes of their own.

use std::fmt;

use anyhow::bail;
use serde::{Deserialize, Deserializer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// HTTP API, WebSocket, bot processing and webhook endpoints; presence.
    Gateway,
    /// Conversations, messages, notifications, registration (gRPC `Routing`).
    Routing,
    /// Bots, webhooks, event subscriptions, the relay (gRPC `Bots`, `BotProcessing`).
    Bots,
    /// A voter of the Raft-replicated session registry.
    Registry,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Routing => "routing",
            Role::Bots => "bots",
            Role::Registry => "registry",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Role> {
        match text.trim() {
            "gateway" => Ok(Role::Gateway),
            "routing" => Ok(Role::Routing),
            "bots" => Ok(Role::Bots),
            "registry" => Ok(Role::Registry),
            other => bail!("unknown role {other:?}: use gateway, routing, bots or registry (or all)"),
        }
    }
}

/// The set of roles of this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Roles(Vec<Role>);

impl Default for Roles {
    /// Everything but a registry voter: one process serves the whole product.
    fn default() -> Self {
        Roles(vec![Role::Gateway, Role::Routing, Role::Bots])
    }
}

impl Roles {
    /// Parses "gateway,routing" or "all".
    pub fn parse(text: &str) -> anyhow::Result<Roles> {
        let mut roles = Vec::new();
        for part in text.split(',').map(str::trim).filter(|part| !part.is_empty()) {
            if part == "all" {
                roles.extend(Roles::default().0);
            } else {
                roles.push(part.parse()?);
            }
        }
        roles.sort();
        roles.dedup();
        if roles.is_empty() {
            bail!("no role is given: use gateway, routing, bots, registry or all");
        }
        Ok(Roles(roles))
    }

    pub fn has(&self, role: Role) -> bool {
        self.0.contains(&role)
    }

    /// The default: gateway, routing and bots in one process.
    pub fn is_all_in_one(&self) -> bool {
        self.has(Role::Gateway) && self.has(Role::Routing) && self.has(Role::Bots)
    }

    /// Whether this process opens the database.
    pub fn needs_store(&self) -> bool {
        self.has(Role::Routing) || self.has(Role::Bots)
    }

    /// Whether this process keeps files in its data directory: the embedded
    /// database and the mail outbox (routing, bots), or the Raft log.
    pub fn uses_data_dir(&self) -> bool {
        self.needs_store() || self.has(Role::Registry)
    }

    /// Whether this process serves internal gRPC: a registry voter always;
    /// routing and bots when other processes call them (the roles are split).
    pub fn serves_grpc(&self) -> bool {
        self.has(Role::Registry) || (!self.is_all_in_one() && self.needs_store())
    }

    /// Whether this process opens the event bus. Everything but a bots
    /// process does; a bots process of its own listens on a shared (Redis)
    /// bus for outbox commits, and has nothing to hear on a private one.
    pub fn needs_bus(&self, shared_bus: bool) -> bool {
        self.has(Role::Gateway) || self.has(Role::Routing) || self.has(Role::Registry) || shared_bus
    }

    pub fn iter(&self) -> impl Iterator<Item = Role> + '_ {
        self.0.iter().copied()
    }
}

impl fmt::Display for Roles {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|role| role.as_str()).collect();
        formatter.write_str(&names.join(","))
    }
}

impl<'de> Deserialize<'de> for Roles {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Roles, D::Error> {
        let names = Vec::<String>::deserialize(deserializer)?;
        Roles::parse(&names.join(",")).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_and_reject_typos() {
        assert_eq!(Roles::parse("all").unwrap(), Roles::default());
        assert!(Roles::parse("all").unwrap().is_all_in_one());
        let gateway = Roles::parse(" gateway , gateway").unwrap();
        assert_eq!(gateway.to_string(), "gateway");
        assert!(!gateway.needs_store());
        assert!(Roles::parse("registry").unwrap().serves_grpc());
        assert!(Roles::parse("routing").unwrap().serves_grpc());
        assert!(!Roles::default().serves_grpc(), "the all-in-one calls its services in process");
        assert!(!gateway.serves_grpc());
        assert!(!gateway.uses_data_dir());
        assert!(!Roles::parse("bots").unwrap().needs_bus(false));
        assert!(Roles::parse("bots").unwrap().needs_bus(true));
        let typo = Roles::parse("gateway,routng").unwrap_err().to_string();
        assert!(typo.contains("routng"), "{typo}");
        assert!(Roles::parse("").is_err());
    }
}
