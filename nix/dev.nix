# `nix run .#dev`: MinIO in a temporary directory on loopback with generated
# credentials, a bucket, and cvm-init against it (the default replicate layout,
# or the spec's FUSE mount with CVM_STORAGE=mount), until Ctrl-C.
{ lib
, writeShellApplication
, cvm-init
, rclone
, minio
, openclaw
, coreutils
, curl
, fuse3
, gnugrep
, util-linux
,
}:

writeShellApplication {
  name = "cvm-init-dev";
  runtimeInputs = [
    cvm-init
    rclone
    minio
    openclaw
    coreutils
    curl
    # fusermount3 for cvm-init's mount layout, grep and umount for the cleanup.
    (lib.getBin fuse3)
    gnugrep
    util-linux
  ];
  # cleanup only runs from the EXIT trap: older shellchecks call it unreachable
  # (SC2317), 0.11 calls it never invoked (SC2329, info level, which
  # writeShellApplication's check still fails on).
  excludeShellChecks = [ "SC2317" "SC2329" ];
  text = ''
    work=$(mktemp -d "''${TMPDIR:-/tmp}/cvm-init-dev.XXXXXX")
    minio_pid=
    cleanup() {
      if [ -n "$minio_pid" ]; then kill "$minio_pid" 2>/dev/null || true; fi
      if [ -d "$work/state" ] && grep -qs " $work/state " /proc/self/mountinfo; then
        fusermount3 -u "$work/state" 2>/dev/null || umount -l "$work/state" 2>/dev/null || true
      fi
      rm -rf "$work"
    }
    trap cleanup EXIT

    layout=''${CVM_STORAGE:-replicate}
    if [ "$layout" = mount ]; then
      # The mount layout needs FUSE: root (fusermount3 is not setuid in nixpkgs) and /dev/fuse.
      if [ "$(id -u)" != 0 ]; then
        echo "cvm-init-dev: CVM_STORAGE=mount needs root: FUSE mounts need it (nixpkgs' fusermount3 is not setuid)." >&2
        echo "             Run it with sudo, or without CVM_STORAGE=mount (the replicate layout needs no FUSE)." >&2
        exit 1
      fi
      if [ ! -c /dev/fuse ]; then
        echo "cvm-init-dev: /dev/fuse is missing; load the fuse module or use the replicate layout." >&2
        exit 1
      fi
    fi

    port=''${CVM_DEV_PORT:-9000}
    user=dev$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')
    pass=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
    mkdir -p "$work/minio"
    MINIO_ROOT_USER=$user MINIO_ROOT_PASSWORD=$pass \
      minio server --quiet --address "127.0.0.1:$port" --console-address "127.0.0.1:$((port + 1))" "$work/minio" \
      >"$work/minio.log" 2>&1 &
    minio_pid=$!
    for _ in $(seq 100); do
      curl -fs "http://127.0.0.1:$port/minio/health/live" >/dev/null && break
      sleep 0.1
    done
    curl -fs "http://127.0.0.1:$port/minio/health/live" >/dev/null || {
      echo "cvm-init-dev: MinIO did not start on 127.0.0.1:$port; its log:" >&2
      cat "$work/minio.log" >&2
      exit 1
    }

    export S3_BUCKET=cvm-dev S3_ENDPOINT=http://127.0.0.1:$port S3_PROVIDER=Minio
    export AWS_ACCESS_KEY_ID=$user AWS_SECRET_ACCESS_KEY=$pass
    RCLONE_CRYPT_PASSWORD=$(rclone obscure "$(head -c 32 /dev/urandom | base64)")
    export RCLONE_CRYPT_PASSWORD CVM_STORAGE=$layout
    rclone --config /dev/null mkdir \
      ":s3,provider=Minio,env_auth=true,endpoint='$S3_ENDPOINT':$S3_BUCKET"

    export OPENCLAW_STATE_DIR=$work/state CVM_LOCAL_DIR=$work/local CVM_RUN_DIR=$work/run
    export CVM_GATEWAY_CMD=''${CVM_GATEWAY_CMD:-openclaw gateway run --bind loopback --port 18789 --allow-unconfigured --auth none --dev}
    cat <<INFO
    cvm-init-dev ($layout layout)
      MinIO:      $S3_ENDPOINT  bucket $S3_BUCKET  (user $user; data in $work/minio)
      state dir:  $OPENCLAW_STATE_DIR
      gateway:    $CVM_GATEWAY_CMD  (GET http://127.0.0.1:18789/health)
      ciphertext: AWS_ACCESS_KEY_ID=$user AWS_SECRET_ACCESS_KEY=$pass rclone --config /dev/null lsf -R ":s3,provider=Minio,env_auth=true,endpoint='$S3_ENDPOINT':$S3_BUCKET"
      Ctrl-C stops cvm-init (data-safe order), then MinIO, and removes $work.
    INFO
    # Not exec: the trap must run after cvm-init's shutdown.
    cvm-init || status=$?
    exit "''${status:-0}"
  '';
  meta = {
    description = "cvm-init against a throwaway local MinIO";
    mainProgram = "cvm-init-dev";
    platforms = lib.platforms.linux;
  };
}
