# `nix flake check`: the package build (with unit tests), lint of the Nix files,
# the image streamed twice byte for byte, and NixOS VM tests that `docker load`
# the image and run it against MinIO.
{ pkgs, self }:

let
  inherit (pkgs) lib;
  packages = self.packages.${pkgs.stdenv.hostPlatform.system};
  inherit (packages) image;

  nixFiles = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.fileFilter (file: file.hasExt "nix") ../.;
  };

  # The crypt keys come from MASTER_KEY, so the test needs no `rclone obscure` step.
  s3Env = lib.concatStringsSep " " [
    "-e S3_BUCKET=cvm"
    "-e S3_ENDPOINT=http://s3:9000"
    "-e S3_PROVIDER=Minio"
    "-e AWS_ACCESS_KEY_ID=cvmtest"
    "-e AWS_SECRET_ACCESS_KEY=cvmtest-secret"
    "-e MASTER_KEY=vm-test-master-key"
  ];
  imageRef = "${image.imageName}:${image.tag}";
  # A stand-in gateway for the layouts OpenClaw cannot run on (facts.md §1).
  writer = file: "sh -c 'echo written-by-${file} > /data/openclaw/${file}; exec sleep infinity'";
in
{
  package = packages.cvm-init;

  # The same two tools `scripts/nix-check` runs where Nix cannot evaluate.
  lint = pkgs.runCommand "cvm-init-nix-lint" { nativeBuildInputs = [ pkgs.deadnix pkgs.nixpkgs-fmt ]; } ''
    cd ${nixFiles}
    deadnix --fail .
    nixpkgs-fmt --check $(find . -name '*.nix')
    touch $out
  '';

  # The stream is deterministic: the same store paths give the same bytes.
  # (`nix build .#image --rebuild` checks the layers' derivations as well.)
  image-reproducible = pkgs.runCommand "cvm-init-image-reproducible" { } ''
    ${image.stream} > a.tar
    ${image.stream} > b.tar
    cmp a.tar b.tar
    cmp a.tar ${image}
    touch $out
  '';

  vm = pkgs.testers.runNixOSTest {
    name = "cvm-init";
    nodes = {
      s3 = {
        services.minio = {
          enable = true;
          rootCredentialsFile = pkgs.writeText "minio-credentials" ''
            MINIO_ROOT_USER=cvmtest
            MINIO_ROOT_PASSWORD=cvmtest-secret
          '';
        };
        networking.firewall.allowedTCPPorts = [ 9000 ];
        # MinIO wants at least 1 GiB of disk and pre-allocates about 2 GiB of memory.
        virtualisation.diskSize = 4096;
        virtualisation.memorySize = 3072;
      };
      host = {
        virtualisation.docker.enable = true;
        virtualisation.diskSize = 8192;
        virtualisation.memorySize = 4096;
        environment.systemPackages = [
          pkgs.rclone
          pkgs.curl
        ];
      };
    };
    testScript = ''
      def exit_code(name):
          host.wait_until_succeeds(f"test $(docker inspect -f '{{{{.State.Running}}}}' {name}) = false", timeout=60)
          return int(host.succeed(f"docker inspect -f '{{{{.State.ExitCode}}}}' {name}").strip())

      start_all()
      s3.wait_for_unit("minio.service")
      s3.wait_for_open_port(9000)
      host.wait_for_unit("sockets.target")
      host.succeed("docker load --input=${image}")
      host.succeed(
          "rclone --config /dev/null mkdir "
          + "\":s3,provider=Minio,endpoint='http://s3:9000',access_key_id=cvmtest,secret_access_key=cvmtest-secret:cvm\""
      )

      with subtest("replicate layout, no privileges: the image's OpenClaw serves, state is encrypted"):
          host.succeed("docker run -d --name r1 --network host ${s3Env} -e OPENCLAW_GATEWAY_TOKEN=vm-token ${imageRef}")
          host.wait_until_succeeds("curl -fs http://127.0.0.1:18789/health", timeout=180)
          host.succeed("docker exec r1 sh -c 'echo plaintext-canary > /data/openclaw/canary.txt'")
          host.succeed("docker stop -t 10 r1")
          assert exit_code("r1") == 0, host.succeed("docker logs r1 2>&1")
          # MinIO keeps objects under their key names: none may be readable.
          s3.fail("find /var/lib/minio/data | grep -E 'canary|openclaw.json|workspace'")
          s3.fail("grep -r plaintext-canary /var/lib/minio/data")

      with subtest("cvm-init check: a good setup passes, a wrong key is 77, nothing written"):
          # MinIO's own bookkeeping (.minio.sys) may change on reads; the objects may not.
          objects = "find /var/lib/minio/data -type f -not -path '*/.minio.sys/*' | sort | xargs md5sum"
          before = s3.succeed(objects)
          host.succeed("docker run --rm --network host ${s3Env} ${imageRef} check")
          rc, out = host.execute(
              "docker run --rm --network host ${s3Env} -e MASTER_KEY=not-the-key ${imageRef} check"
          )
          assert rc == 77 and "PROBLEM  key:" in out, out
          assert s3.succeed(objects) == before

      with subtest("a new container restores everything"):
          host.succeed("docker run -d --name r2 --network host ${s3Env} -e OPENCLAW_GATEWAY_TOKEN=vm-token ${imageRef}")
          host.wait_until_succeeds("curl -fs http://127.0.0.1:18789/health", timeout=180)
          assert host.succeed("docker exec r2 cat /data/openclaw/canary.txt").strip() == "plaintext-canary"
          host.succeed("docker stop -t 10 r2")
          assert exit_code("r2") == 0

      with subtest("mount layout, --privileged, as the spec runs it"):
          host.succeed(
              "docker run -d --name m1 --privileged --network host ${s3Env} -e S3_PREFIX=mount-layout "
              + "-e CVM_STORAGE=mount -e CVM_GATEWAY_CMD=\"${writer "m.txt"}\" ${imageRef}"
          )
          host.wait_until_succeeds("docker exec m1 cat /data/openclaw/m.txt", timeout=60)
          host.succeed("docker stop -t 10 m1")
          assert exit_code("m1") == 0, host.succeed("docker logs m1 2>&1")
          host.succeed(
              "docker run -d --name m2 --privileged --network host ${s3Env} -e S3_PREFIX=mount-layout "
              + "-e CVM_STORAGE=mount -e CVM_GATEWAY_CMD='sleep infinity' ${imageRef}"
          )
          host.wait_until_succeeds("docker exec m2 cat /data/openclaw/m.txt | grep written-by-m.txt", timeout=60)
          host.succeed("docker stop -t 10 m2")

      with subtest("local mode without S3_BUCKET"):
          host.succeed("docker run -d --name l1 -e CVM_GATEWAY_CMD=\"${writer "l.txt"}\" ${imageRef}")
          host.wait_until_succeeds("docker exec l1 cat /data/openclaw/l.txt", timeout=60)
          host.succeed("docker stop -t 10 l1")
          assert exit_code("l1") == 0
          assert "local (no S3_BUCKET)" in host.succeed("docker logs l1 2>&1")
    '';
  };
}
