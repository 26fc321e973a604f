# `nix build .#image`: a docker-archive tarball for `docker load`, bit-identical for
# identical inputs (streamLayeredImage fixes mtimes, owners and member order, and
# `created` is 1970-01-01T00:00:01Z unless set).
{ lib
, dockerTools
, runCommand
, cvm-init
, rclone
, fuse3
, openclaw
, coreutils
,
}:

let
  # An explicit tag: the default would be a derivation hash, useless to a user.
  tag = cvm-init.version;
  stream = dockerTools.streamLayeredImage {
    name = "cvm-init";
    inherit tag;
    contents = [
      cvm-init
      # nixpkgs' rclone already has fuse3 on its PATH; fusermount3 also goes on
      # the image's, for the mount layout (the container runs as root).
      rclone
      (lib.getBin fuse3)
      openclaw
      # A shell and coreutils for `docker exec` and for stand-in gateways.
      coreutils
      dockerTools.binSh
      dockerTools.usrBinEnv
      dockerTools.caCertificates
      dockerTools.fakeNss
    ];
    # Relative paths: these run in the image's root.
    extraCommands = ''
      mkdir -p tmp root data/openclaw data/openclaw-local run
      chmod 1777 tmp
      chmod 0700 root
    '';
    config = {
      Entrypoint = [ (lib.getExe cvm-init) ];
      Env = [
        "PATH=/bin"
        # cvm-init's built-in default is the spec's command; a fresh state dir has no
        # gateway config yet, so the image lets the gateway start unconfigured (it then
        # requires OPENCLAW_GATEWAY_TOKEN, as any non-loopback bind does).
        "CVM_GATEWAY_CMD=openclaw gateway run --bind lan --port 18789 --allow-unconfigured"
        "HOME=/root"
        "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"
      ];
      ExposedPorts."18789/tcp" = { };
      Labels = {
        "org.opencontainers.image.title" = "cvm-init";
        "org.opencontainers.image.version" = cvm-init.version;
        "org.opencontainers.image.source" = "cvm-init";
        "dev.cvm-init.rclone.version" = rclone.version;
        "dev.cvm-init.openclaw.version" = openclaw.version;
      };
    };
  };
in
# The stream is a script that writes the tar to stdout; keep the tar itself.
runCommand "cvm-init-image-${tag}.tar"
{
  passthru = {
    inherit stream tag;
    imageName = "cvm-init";
  };
}
  ''
    ${stream} > $out
  ''
