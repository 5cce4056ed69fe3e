"""The `vibrato` command line: parse, call one engine or catalog function, print key=value lines."""
import rich_click as click

from vibrato import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="vibrato")
def cli():
    """Vibrato: a vector database for audio embeddings."""


def main():
    cli(prog_name="vibrato")


if __name__ == "__main__":
    main()
