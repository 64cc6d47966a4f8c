//! Presence as the Dial sees it: one `BatchGetPresence` for the Clients being rung, and the
//! limiter's word on the connected communications of each identity that has a device to
//! ring.

use std::time::Duration;

use proto::presence::v1 as ppb;

use super::slot;
use crate::communication::{ClientPresence, IdentityUsage, LiveDevice};
use crate::peers::Peers;

/// How long the presence read may take.
const PRESENCE_DEADLINE: Duration = Duration::from_secs(3);

/// Reads the presence of `identities` of `account`, and the limiter's word on the
/// connected communications of each that has an available live device.
pub(crate) async fn read(
    peers: &Peers,
    account: &str,
    identities: Vec<String>,
) -> Result<Vec<ClientPresence>, String> {
    let mut presence = peers.presence().map_err(|e| e.to_string())?;
    let request = ppb::BatchGetPresenceRequest {
        account_id: account.to_owned(),
        identities: identities.clone(),
        min_revision: 0,
    };
    let answer = tokio::time::timeout(PRESENCE_DEADLINE, presence.batch_get_presence(request))
        .await
        .map_err(|_| "presence did not answer within 3 s".to_owned())?
        .map_err(|s| format!("presence lookup failed: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let mut read = Vec::with_capacity(identities.len());
    for (identity, found) in identities.iter().zip(answer.presences) {
        let live: Vec<LiveDevice> = found
            .devices
            .iter()
            .filter(|d| d.status == ppb::Status::Available as i32)
            .filter(|d| d.connection_kind == ppb::ConnectionKind::Stream as i32)
            .map(|d| LiveDevice {
                device_id: d.device_id.clone(),
                replica: d.replica.clone(),
            })
            .collect();
        let usage = if live.is_empty() {
            IdentityUsage::Unlimited
        } else {
            slot::identity_usage(peers, account, identity).await
        };
        read.push(ClientPresence {
            status: ppb::Status::try_from(found.status).unwrap_or(ppb::Status::Offline),
            devices: found.devices.len(),
            live,
            usage,
        });
    }
    Ok(read)
}
