//! Who a request acts for: the account (the token's, or one a platform token names) and,
//! for writes, the identity (the token's `identity` claim; only platform and `admin`
//! tokens may name another).

use plumbing::auth::{AuthError, Caller};
use plumbing::validate::{self, FieldError};

use crate::error::Error;
use crate::record::{DeviceKey, new_uuid};
use crate::rules;

/// The device a write names, as the request gives it.
#[derive(Debug, Clone, Copy)]
pub struct DeviceRef<'a> {
    /// `account_id` (empty: the token's).
    pub account_id: &'a str,
    /// `identity` (empty: the token's claim).
    pub identity: &'a str,
    /// `device_id`.
    pub device_id: &'a str,
}

/// What to do with an empty `device_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmptyDevice {
    /// Generate one (Register, Connect).
    Generate,
    /// Refuse (every other write).
    Refuse,
}

/// The account a request acts on; a platform token must name one.
pub fn account(caller: &Caller, field: &str, requested: &str) -> Result<String, Error> {
    let account = caller.account_for(requested).map_err(|err| match err {
        AuthError::AccountRequired => Error::Invalid(FieldError::new(
            field,
            "required with a platform token (`*` is not an account)",
        )),
        other => Error::Auth(other),
    })?;
    validate::account_id(field, &account)?;
    Ok(account)
}

/// The device key a write acts on. `fields` prefixes the field names in errors
/// (`hello.` for Connect).
pub fn acting_key(
    caller: &Caller,
    fields: &str,
    device: DeviceRef<'_>,
    empty: EmptyDevice,
) -> Result<DeviceKey, Error> {
    let account = account(caller, &format!("{fields}account_id"), device.account_id)?;
    let identity = acting_identity(caller, &format!("{fields}identity"), device.identity)?;
    let device_field = format!("{fields}device_id");
    let device_id = match (device.device_id.is_empty(), empty) {
        (true, EmptyDevice::Generate) => new_uuid(),
        (true, EmptyDevice::Refuse) => {
            return Err(FieldError::new(device_field, "must not be empty").into());
        }
        (false, _) => {
            rules::device_id(&device_field, device.device_id)?;
            device.device_id.to_owned()
        }
    };
    Ok(DeviceKey {
        account,
        identity,
        device_id,
    })
}

fn acting_identity(caller: &Caller, field: &str, requested: &str) -> Result<String, Error> {
    let own = caller.identity.as_deref();
    let identity = match (requested.is_empty(), own) {
        (true, Some(own)) => own,
        (true, None) => {
            return Err(FieldError::new(
                field,
                "required: the token has no `identity` claim to default to",
            )
            .into());
        }
        (false, Some(own)) if own == requested => requested,
        (false, _) if caller.may_act_for_others() => requested,
        (false, own) => {
            return Err(AuthError::ForeignIdentity {
                token: own.unwrap_or("<none>").to_owned(),
                requested: requested.to_owned(),
            }
            .into());
        }
    };
    rules::identity(field, identity)?;
    Ok(identity.to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use plumbing::auth::Scope;

    use super::*;

    fn caller(identity: Option<&str>, platform: bool, scopes: &[Scope]) -> Caller {
        Caller {
            account: "AC1".into(),
            identity: identity.map(str::to_owned),
            scopes: scopes.to_vec(),
            platform,
            key_id: "k".into(),
        }
    }

    fn key(caller: &Caller, identity: &str) -> Result<DeviceKey, Error> {
        let device = DeviceRef {
            account_id: "",
            identity,
            device_id: "d1",
        };
        acting_key(caller, "", device, EmptyDevice::Refuse)
    }

    #[test]
    fn identity_defaults_to_the_token_and_others_need_platform_or_admin() {
        let alice = caller(Some("alice"), false, &[Scope::PresenceRegister]);
        assert_eq!(key(&alice, "").unwrap().identity, "alice");
        assert_eq!(key(&alice, "alice").unwrap().identity, "alice");
        assert!(matches!(
            key(&alice, "bob"),
            Err(Error::Auth(AuthError::ForeignIdentity { .. }))
        ));
        let anonymous = caller(None, false, &[Scope::PresenceRegister]);
        assert!(matches!(key(&anonymous, ""), Err(Error::Invalid(_))));
        assert!(matches!(key(&anonymous, "bob"), Err(Error::Auth(_))));
        let admin = caller(None, false, &[Scope::Admin]);
        assert_eq!(key(&admin, "bob").unwrap().identity, "bob");
        let platform = caller(None, true, &[Scope::PresenceRegister]);
        assert_eq!(key(&platform, "bob").unwrap().identity, "bob");
    }

    #[test]
    fn empty_device_ids_are_generated_or_refused() {
        let alice = caller(Some("alice"), false, &[]);
        let device = DeviceRef {
            account_id: "",
            identity: "",
            device_id: "",
        };
        let generated = acting_key(&alice, "hello.", device, EmptyDevice::Generate).unwrap();
        assert_eq!(generated.device_id.len(), 36);
        let refused = acting_key(&alice, "", device, EmptyDevice::Refuse).unwrap_err();
        assert_eq!(refused.to_string(), "device_id: must not be empty");
    }
}
