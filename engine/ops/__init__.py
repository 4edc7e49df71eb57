"""What an operations team runs medrelay with: health and readiness, alerts, retention, backups.

These watch and maintain the store and the runtime's workers; they run inside the engine
(started by the runtime, on the core layer) or from the command line, and never touch a
message's way through beyond reading its state.
"""
