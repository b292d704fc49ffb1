"""The two APIs the relay talks to, Qonto's Business API and Cegid Loop's."""
