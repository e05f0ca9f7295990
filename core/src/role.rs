//! The roles a credential can hold, as the control plane checks them and
//! the CLI names them. The wire form is `isdp.v1.Role`; this is the domain
//! form, without the proto's "unspecified".

use isdp_proto::v1::Role as ProtoRole;

/// What a caller may do; `Read < Write < Admin`, and `Join` is a sidecar's
/// role, scoped to services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Write,
    Admin,
    Join,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
            Role::Join => "join",
        }
    }

    /// Whether this role includes `other` in the read < write < admin order
    /// (join includes only itself).
    pub fn includes(self, other: Role) -> bool {
        match (self, other) {
            (a, b) if a == b => true,
            (Role::Admin, Role::Read | Role::Write) => true,
            (Role::Write, Role::Read) => true,
            _ => false,
        }
    }

    pub fn from_proto(r: i32) -> Option<Role> {
        match ProtoRole::try_from(r).ok()? {
            ProtoRole::Read => Some(Role::Read),
            ProtoRole::Write => Some(Role::Write),
            ProtoRole::Admin => Some(Role::Admin),
            ProtoRole::Join => Some(Role::Join),
            ProtoRole::Unspecified => None,
        }
    }

    pub fn to_proto(self) -> ProtoRole {
        match self {
            Role::Read => ProtoRole::Read,
            Role::Write => ProtoRole::Write,
            Role::Admin => ProtoRole::Admin,
            Role::Join => ProtoRole::Join,
        }
    }

    /// The role a CLI or config names (`read`, `write`, `admin`, `join`).
    pub fn parse(name: &str) -> Option<Role> {
        [Role::Read, Role::Write, Role::Admin, Role::Join]
            .into_iter()
            .find(|r| r.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_order_and_wire_form() {
        for r in [Role::Read, Role::Write, Role::Admin, Role::Join] {
            assert_eq!(Role::parse(r.name()), Some(r));
            assert_eq!(Role::from_proto(r.to_proto() as i32), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
        assert_eq!(Role::from_proto(ProtoRole::Unspecified as i32), None);
        assert!(Role::Admin.includes(Role::Read) && Role::Write.includes(Role::Read));
        assert!(!Role::Join.includes(Role::Read) && !Role::Read.includes(Role::Write));
    }
}
