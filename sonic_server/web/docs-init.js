// Swagger UI for this server's own document; "Try it out" calls this server. No validator
// badge (it would call an outside site), nothing loaded from elsewhere.
"use strict";
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  validatorUrl: null,
  deepLinking: true,
  tryItOutEnabled: false,
  persistAuthorization: true,
});
