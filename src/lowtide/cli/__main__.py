from lowtide.cli import app

app()
