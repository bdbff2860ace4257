"""Request and response bodies: the job API's (``jobs``) and OpenAI's (``openai``)."""
