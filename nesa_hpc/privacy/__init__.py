"""Everything about what Z reveals: the mechanism and its ledger (mechanism), the owner-side denoiser
(denoiser), and the audit that measures what attackers recover (audit)."""
