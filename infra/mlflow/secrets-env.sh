#!/bin/sh
# Docker's secrets convention for programs that only read environment variables (MLflow, boto3, libpq): for every
# NAME_FILE=/run/secrets/... in the environment, export NAME with that file's content, then run the command. Secrets
# so reach the process's environment, never its command line (which `ps` shows every user of the host).
set -eu
for name in $(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)_FILE=\/run\/secrets\/.*/\1/p'); do
    eval "path=\${${name}_FILE}"
    if [ ! -r "$path" ]; then
        echo "secrets-env.sh: ${name}_FILE names $path, which is missing or unreadable (see infra/README.md)" >&2
        exit 1
    fi
    value=$(cat "$path")
    export "$name=$value"
    unset "${name}_FILE"
done
exec "$@"
