"""Who may call the job-service: bearer JWTs and mTLS identities, one policy table, TLS.

See README "Security". Nothing here runs at import time.
"""
