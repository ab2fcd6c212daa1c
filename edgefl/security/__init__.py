"""Who may talk to the broker: a fleet CA and its certificates, and the broker set-up they need."""
