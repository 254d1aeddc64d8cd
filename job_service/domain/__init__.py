"""The job lifecycle, free of gRPC, SQL and S3: statuses, transitions, fencing and errors."""
