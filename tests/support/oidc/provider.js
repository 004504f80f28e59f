// A real OpenID provider (panva's oidc-provider) on loopback, for HAIF's OIDC tests.
//
//   node provider.js PORT JWKS_FILE
//
// Issuer http://127.0.0.1:PORT. JWKS_FILE holds the signing keys (a private JWK Set the
// test writes, so that it can also forge tokens with a kid the provider publishes); the
// first RSA key signs. Rotating keys = restarting on the same port with another file.
// Clients (client_credentials, client_secret_basic, secret "secret-" + id):
//   "tenant-a" -> haif_tenant "acme", "tenant-b" -> "globex", "suspended" -> "frozen",
//   "unknown" -> "nobody", "no-tenant" -> no claim.
// Access tokens are JWTs for the resource indicator given (`resource=`), as the audience.
// Prints "ready http://127.0.0.1:PORT" once it listens.
import { readFileSync } from 'node:fs';

import Provider from 'oidc-provider';

const port = Number(process.argv[2] || process.env.PORT);
const jwksFile = process.argv[3] || process.env.JWKS_FILE;
if (!Number.isInteger(port) || port <= 0 || !jwksFile) {
  console.error('usage: node provider.js PORT JWKS_FILE');
  process.exit(2);
}
const jwks = JSON.parse(readFileSync(jwksFile, 'utf8'));
const issuer = `http://127.0.0.1:${port}`;
const SCOPES = 'haif:inference haif:admin haif:tenant_admin';
const TENANTS = {
  'tenant-a': 'acme', 'tenant-b': 'globex', suspended: 'frozen', unknown: 'nobody', 'no-tenant': null,
};

const clients = Object.entries(TENANTS).map(([id, tenant]) => ({
  client_id: id,
  client_secret: `secret-${id}`,
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
  token_endpoint_auth_method: 'client_secret_basic',
  scope: SCOPES,
  ...(tenant ? { haif_tenant: tenant } : {}),
}));

const provider = new Provider(issuer, {
  clients,
  jwks,
  scopes: ['openid', ...SCOPES.split(' ')],
  extraClientMetadata: { properties: ['haif_tenant'] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async (_ctx, _client, oneOf) => oneOf,
      getResourceServerInfo: async (_ctx, resourceIndicator) => ({
        scope: SCOPES,
        accessTokenFormat: 'jwt',
        audience: resourceIndicator,
        accessTokenTTL: 600,
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
  extraTokenClaims: async (ctx, token) => {
    const client = ctx.oidc.client || (token.clientId && await ctx.oidc.provider.Client.find(token.clientId));
    return client && client.haif_tenant ? { haif_tenant: client.haif_tenant } : undefined;
  },
});
provider.on('server_error', (_ctx, err) => console.error('server_error', err));

const server = provider.listen(port, '127.0.0.1', () => {
  console.log(`ready ${issuer}`);
});
const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
