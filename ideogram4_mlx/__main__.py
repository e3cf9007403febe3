from ideogram4_mlx.cli import main

main(prog_name="ideo4-mlx")
