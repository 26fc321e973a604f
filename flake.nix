{
  description = "cvm-init: PID 1 that keeps an app's state in an S3 bucket, encrypted by rclone crypt";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      # openclaw and minio carry meta.knownVulnerabilities; permit exactly those two,
      # on this pkgs instance (never as nixpkgs.config inside a test node).
      pkgsFor =
        system:
        import nixpkgs {
          inherit system;
          config.allowInsecurePredicate =
            p:
            builtins.elem (lib.getName p) [
              "openclaw"
              "minio"
            ];
        };
      forAllSystems = f: lib.genAttrs systems (system: f (pkgsFor system));
    in
    {
      packages = forAllSystems (
        pkgs:
        let
          cvm-init = pkgs.callPackage ./nix/package.nix { };
        in
        {
          inherit cvm-init;
          default = cvm-init;
          image = pkgs.callPackage ./nix/image.nix { inherit cvm-init; };
          dev = pkgs.callPackage ./nix/dev.nix { inherit cvm-init; };
        }
      );

      apps = forAllSystems (pkgs: {
        dev = {
          type = "app";
          meta.description = "cvm-init against a throwaway local MinIO";
          program = lib.getExe self.packages.${pkgs.stdenv.hostPlatform.system}.dev;
        };
      });

      checks = forAllSystems (pkgs: import ./nix/checks.nix { inherit pkgs self; });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            cargo-nextest
            rclone
            fuse3
            sqlite
            minio
            deadnix
            nixpkgs-fmt
          ];
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixpkgs-fmt);
    };
}
