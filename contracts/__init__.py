"""The one definition of what crosses payonce's boundaries: API objects, errors, commands,
events, enums and the PaymentIntent transition table."""
