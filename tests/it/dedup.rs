//! Coalescing, detachment, replay, scopes and key misuse (DESIGN sections 2, 4, 5).
